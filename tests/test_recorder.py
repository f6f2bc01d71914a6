"""aul_jax.Recorder: a training run's statistics, recorded batch by batch in any loop."""

import jax.numpy as jnp
import numpy as np
import pytest

import aul_jax
from aul_jax import api
from tests.test_api import noisy_logits


def record(logits_TxNxK, labels_N, *, batch=37, convert=np.asarray, seed=0, **kwargs):
  """Feeds every epoch's logits in shuffled, uneven batches, as a training loop would."""
  epochs, num_examples, num_classes = logits_TxNxK.shape
  recorder = aul_jax.Recorder(num_examples, num_classes)
  rng = np.random.default_rng(seed)
  for t in range(epochs):
    for ids in np.array_split(rng.permutation(num_examples), num_examples // batch):
      recorder.update(convert(ids), convert(labels_N[ids]), logits=convert(logits_TxNxK[t, ids]))
    recorder.end_epoch()
  return recorder


def test_recorded_statistics_equal_the_training_runs_fold():
  logits, given_N, _, _ = noisy_logits()
  recorder = record(logits, given_N)
  expected = api.statistics_from_logits(logits, given_N)
  got = recorder.statistics()
  assert set(got) == set(expected)
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
  assert recorder.epochs == logits.shape[0]


def test_result_is_find_label_issues_of_the_same_logits():
  logits, given_N, _, _ = noisy_logits(seed=3)
  recorded = record(logits, given_N).result()
  direct = aul_jax.find_label_issues(given_N, logits=logits)
  np.testing.assert_array_equal(recorded.is_label_issue_N, direct.is_label_issue_N)
  np.testing.assert_array_equal(recorded.suggested_label_N, direct.suggested_label_N)
  np.testing.assert_array_equal(recorded.ranked_indices, direct.ranked_indices)
  np.testing.assert_array_equal(recorded.labels_N, given_N)


def test_jax_arrays_and_foreign_arrays_record_alike():
  logits, given_N, _, _ = noisy_logits(num_examples=80, epochs=3)

  class Foreign:  # Another framework's tensor: only the __array__ protocol.
    def __init__(self, x):
      self.x = x

    def __array__(self, dtype=None, copy=None):
      return np.asarray(self.x, dtype)

  reference = record(logits, given_N).statistics()
  for convert in (jnp.asarray, Foreign):
    got = record(logits, given_N, convert=convert).statistics()
    for name in reference:
      np.testing.assert_array_equal(got[name], reference[name], err_msg=name)


def test_torch_tensors_that_require_grad_are_recorded():
  torch = pytest.importorskip('torch')
  logits, given_N, _, _ = noisy_logits(num_examples=60, epochs=2)
  as_tensor = lambda x: torch.tensor(x, requires_grad=np.issubdtype(x.dtype, np.floating))
  reference = record(logits, given_N).statistics()
  got = record(logits, given_N, convert=as_tensor).statistics()
  np.testing.assert_array_equal(got['aum'], reference['aum'])


def test_losses_alone_give_the_aul_and_the_last_loss():
  logits, given_N, _, wrong_N = noisy_logits(seed=4)
  losses_NxT = api.losses_from_logits(logits, given_N)
  recorder = aul_jax.Recorder(len(given_N))
  for t in range(losses_NxT.shape[1]):
    for ids in np.array_split(np.arange(len(given_N)), 7):
      recorder.update(ids, given_N[ids], losses=losses_NxT[ids, t])
    recorder.end_epoch()
  stats = recorder.statistics()
  assert set(stats) == {'aul', 'last_loss'}
  np.testing.assert_allclose(stats['aul'], losses_NxT.sum(1), rtol=1e-5)
  np.testing.assert_allclose(stats['last_loss'], losses_NxT[:, -1], rtol=1e-6)
  issues = recorder.result()
  assert issues.rule == 'gmm' and np.mean(issues.is_label_issue_N == wrong_N) > 0.9


def test_given_losses_are_the_auls_and_logits_give_the_rest():
  logits, given_N, _, _ = noisy_logits(num_examples=40, epochs=2)
  recorder = aul_jax.Recorder(40, 4)
  for t in range(2):
    recorder.update(np.arange(40), given_N, logits=logits[t], losses=np.full(40, 0.5))
    recorder.end_epoch()
  stats = recorder.statistics()
  np.testing.assert_allclose(stats['aul'], 1.0)
  np.testing.assert_allclose(stats['aum'], api.statistics_from_logits(logits, given_N)['aum'])


def test_an_epoch_that_misses_or_repeats_an_id_is_refused_and_discarded():
  logits, given_N, _, _ = noisy_logits(num_examples=20, epochs=2)
  recorder = aul_jax.Recorder(20, 4)
  recorder.update(np.arange(18), given_N[:18], logits=logits[0, :18])  # drop_last=True.
  with pytest.raises(ValueError, match=r'epoch 1: 2 ids never seen \(e.g. 18, 19\)'):
    recorder.end_epoch()
  recorder.update(np.arange(20), given_N, logits=logits[0])
  recorder.update(np.arange(3), given_N[:3], logits=logits[0, :3])
  with pytest.raises(ValueError, match=r'3 ids seen more than once \(e.g. 0, 1, 2\)'):
    recorder.end_epoch()
  assert recorder.epochs == 0
  for t in range(2):  # Whole epochs after the refused ones count as if those never ran.
    recorder.update(np.arange(20), given_N, logits=logits[t])
    recorder.end_epoch()
  expected = api.statistics_from_logits(logits, given_N)
  np.testing.assert_allclose(recorder.statistics()['aum'], expected['aum'], rtol=1e-6)


@pytest.mark.parametrize(
  'batch, message',
  [
    ({'ids': [0, 5], 'labels': [0, 1]}, 'needs logits='),
    ({'ids': [0, 9], 'labels': [0, 1], 'losses': [1.0, 1.0]}, r'ids must be in \[0, 5\)'),
    ({'ids': [0, 1], 'labels': [0, 3], 'losses': [1.0, 1.0]}, r'labels must be in \[0, 3\)'),
    ({'ids': [0, 1], 'labels': [0.5, 1], 'losses': [1.0, 1.0]}, 'labels must be integers'),
    ({'ids': [0, 1], 'labels': [0], 'losses': [1.0, 1.0]}, '2 ids but 1 labels'),
    ({'ids': [0, 1], 'labels': [0, 1], 'logits': np.ones((2, 4))}, 'have 4 classes'),
  ],
)
def test_bad_batches_are_named(batch, message):
  with pytest.raises(ValueError, match=message):
    aul_jax.Recorder(5, 3).update(**batch)


def test_labels_must_not_change_and_inputs_must_not_switch():
  recorder = aul_jax.Recorder(3, 2)
  recorder.update([0, 1], [0, 1], losses=[1.0, 2.0])
  with pytest.raises(ValueError, match='example 1 was recorded with label 1 and now 0'):
    recorder.update([1], [0], losses=[1.0])
  with pytest.raises(ValueError, match='the first gave losses only, this one logits'):
    recorder.update([2], [0], logits=np.ones((1, 2)))
  with pytest.raises(ValueError, match='no epoch was recorded'):
    recorder.result()
