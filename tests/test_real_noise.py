"""Real label noise: a data set's given labels scored against true labels beside them
(CIFAR-10N's human labels against CIFAR-10's), through TFDS mocked."""

import csv
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from aul_jax import data, pipeline
from aul_jax.errors import UserInputError
from tests.test_pipeline import load_config

NUM_EXAMPLES = 96


def _source_labels(split: str, key: str) -> np.ndarray:
  """One feature of the mocked cifar10_n split, read straight from its source."""
  source = tfds.data_source('cifar10_n', split=split, download=False)
  return np.asarray([source[i][key] for i in range(len(source))])


def test_given_labels_train_and_true_labels_score():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    ds = data.load_dataset('cifar10_n', label_key='worse_label', clean_label_key='label')
    worse, clean = _source_labels('train', 'worse_label'), _source_labels('train', 'label')
    test_clean = _source_labels('test', 'label')
  np.testing.assert_array_equal(ds.y_train, worse)
  np.testing.assert_array_equal(ds.y_train_clean, clean)
  np.testing.assert_array_equal(ds.y_test, test_clean)  # The test split: the true labels.
  assert 0.5 < np.mean(worse != clean) < 1  # The mock's labels are independent draws.
  noisy = pipeline.inject_noise(ds, load_config('cifar10n').noise)
  np.testing.assert_array_equal(noisy.labels, worse)
  np.testing.assert_array_equal(noisy.is_mislabeled, worse != clean)
  assert noisy.truth_known
  assert noisy.noise_rate(0.0) == pytest.approx(np.mean(worse != clean))  # Co-teaching's.


def test_cifar10n_config_runs_and_scores_against_the_true_labels(tmp_path):
  config = load_config('cifar10n')
  config.num_devices = 1
  config.model.name = 'mlp'
  config.aul.epochs = 2
  config.aul.batch_size = 32
  config.retrain.epochs = 0
  config.detector.rounds = 1
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    summary = pipeline.run(config, str(tmp_path), log=lambda _: None)
    clean = _source_labels('train', 'label')
    truth = _source_labels('train', 'worse_label') != clean
  assert summary['true_noise_rate'] == pytest.approx(truth.mean())
  assert 0 <= summary['auroc'] <= 1 and 'f1' in summary
  with open(tmp_path / 'scores.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  np.testing.assert_array_equal([r['is_mislabeled'] == 'true' for r in rows], truth)
  np.testing.assert_array_equal([int(r['true_label']) for r in rows], clean)
  stored = json.loads((tmp_path / 'summary.json').read_text())
  assert stored['true_noise_rate'] == summary['true_noise_rate']


def test_synthetic_noise_on_real_noise_is_refused_before_loading(tmp_path):
  config = load_config('cifar10n')
  config.num_devices = 1
  config.noise.kind, config.noise.rate = 'uniform', 0.2
  with pytest.raises(UserInputError, match="set noise.kind='none'"):
    pipeline.check_config(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'name,label_key,clean_label_key,message',
  [
    ('cifar10_n', 'noisy', '', r"lacks the features \['noisy'\]; features present: .*worse_label"),
    ('cifar10_n', 'worse_label', 'truth', r"lacks the features \['truth'\]"),
    ('cifar10_n', 'label', 'label', 'is data.label_key too'),
    ('cifar10_n', '', '', 'data.label_key is empty'),
    ('digits', 'worse_label', '', "data.name 'digits' has one label per image"),
  ],
)
def test_bad_label_keys_are_named(name, label_key, clean_label_key, message):
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(UserInputError, match=message):
      data.load_dataset(name, label_key=label_key, clean_label_key=clean_label_key)
