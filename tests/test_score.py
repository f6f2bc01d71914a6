"""`aul_jax.score`: the detector for loss trajectories from any framework."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from aul_jax import api, report, score
from aul_jax.errors import UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trajectories(num_examples=400, num_epochs=8, seed=0):
  """Mislabeled examples (30%) keep a higher loss for longer, as in the paper's Figure 3."""
  rng = np.random.default_rng(seed)
  truth = rng.random(num_examples) < 0.3
  decay = np.exp(-np.arange(num_epochs) / np.where(truth, 6.0, 1.5)[:, None])
  losses = 2.3 * decay + rng.gamma(2.0, 0.1, (num_examples, num_epochs))
  return losses, truth


def test_score_finds_the_slow_learners():
  losses, truth = _trajectories()
  scores, summary, tables, pictures = score.score(losses, is_mislabeled_N=truth)
  np.testing.assert_allclose(scores['aul'], losses.sum(1))
  assert set(tables) == {'ranked_issues.csv'}
  assert summary['paper']['noise_estimate'] == summary['noise_estimate']  # The same detector.
  assert summary['auroc'] > 0.99 and summary['f1'] > 0.95
  assert summary['noise_estimate'] == pytest.approx(truth.mean(), abs=0.05)
  np.testing.assert_array_equal(scores['label_issue'], scores['p_mislabeled'] > 0.5)
  np.testing.assert_allclose(scores['label_quality'], 1 - scores['p_mislabeled'])
  assert set(pictures) == {'aul_histogram.png', 'loss_aul_histograms.png', 'auroc_per_epoch.png'}


def test_logits_give_cross_entropy_losses():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 4)).astype(np.float32)
  labels = np.array([0, 3, 1, 1, 2])
  losses = api.losses_from_logits(logits, labels)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_p, labels[None, :, None], -1)[..., 0].T
  np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_ranked_issues_order():
  columns = report.detection_columns(np.arange(4.0), np.array([0.2, 0.9, 0.9, 0.6]))
  ranked = report.ranked_issues(columns)
  np.testing.assert_array_equal(ranked['index'], [1, 2, 3, 0])
  np.testing.assert_array_equal(ranked['label_issue'], [True, True, True, False])


@pytest.mark.parametrize('fmt', ['npy', 'npz', 'csv'])
def test_score_files_writes_the_outputs(fmt, tmp_path):
  losses, truth = _trajectories()
  path = tmp_path / f'losses.{fmt}'
  if fmt == 'npy':
    np.save(path, losses)
  elif fmt == 'npz':
    np.savez(path, losses=losses)
  else:
    np.savetxt(path, losses, delimiter=',', header='e0,e1,e2,e3,e4,e5,e6,e7', comments='')
  np.save(tmp_path / 'truth.npy', truth)
  summary = score.score_files(
    str(tmp_path / 'out'), losses=str(path), truth=str(tmp_path / 'truth.npy')
  )
  assert summary['n_train'] == 400 and summary['auroc'] > 0.99
  with open(tmp_path / 'out' / 'ranked_issues.csv') as f:
    ranked = list(csv.DictReader(f))
  assert len(ranked) == 400 and ranked[0]['label_issue'] == 'true'


def test_cli_with_logits_and_labels(tmp_path):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 50, 3)).astype(np.float32)
  np.save(tmp_path / 'logits.npy', logits)
  np.save(tmp_path / 'labels.npy', rng.integers(0, 3, 50))
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'aul_jax.score',
      f'--logits={tmp_path}/logits.npy',
      f'--labels={tmp_path}/labels.npy',
      f'--workdir={tmp_path}/out',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert summary['n_train'] == 50 and summary['n_epochs'] == 4
  # Logits give the dynamics, so the default detector is a full run's: a negative AUM.
  assert summary['detector'] == {'statistic': 'aum', 'rule': 'sign'}
  with open(tmp_path / 'out' / 'scores.csv') as f:
    rows = list(csv.DictReader(f))
  assert {'aum', 'forgetting_events', 'confidence'} <= set(rows[0])
  assert all((r['flagged'] == 'true') == (float(r['aum']) < 0) for r in rows)
  # The sign rule's p_mislabeled is the 0/1 flag; its label quality stays continuous.
  assert all((float(r['label_quality']) < 0.5) == (r['flagged'] == 'true') for r in rows)
  assert len({r['label_quality'] for r in rows}) > 40


def test_statistics_from_logits_match_a_direct_computation():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(5, 30, 4)).astype(np.float32) * 2
  labels = rng.integers(0, 4, 30)
  stats = api.statistics_from_logits(logits, labels)
  others = logits.copy()
  others[:, np.arange(30), labels] = -np.inf
  margin = logits[:, np.arange(30), labels] - others.max(-1)
  np.testing.assert_allclose(stats['aum'], margin.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['aul'], api.losses_from_logits(logits, labels).sum(1), 1e-5)
  correct = logits.argmax(-1) == labels
  np.testing.assert_allclose(stats['correctness'], correct.mean(0))
  forgotten = (correct[:-1] & ~correct[1:]).sum(0)
  np.testing.assert_array_equal(stats['forgetting_events'], forgotten)


def test_detector_choice_is_checked(tmp_path):
  losses, _ = _trajectories(num_examples=60)
  np.save(tmp_path / 'losses.npy', losses)
  with pytest.raises(UserInputError, match="statistic 'aum' needs --logits"):
    score.score_files(str(tmp_path / 'a'), losses=str(tmp_path / 'losses.npy'), statistic='aum')
  with pytest.raises(UserInputError, match='rule sign needs a margin statistic'):
    score.score_files(str(tmp_path / 'b'), losses=str(tmp_path / 'losses.npy'), rule='sign')
  with pytest.raises(UserInputError, match='give --labels'):
    score.score_files(str(tmp_path / 'c'), losses=str(tmp_path / 'losses.npy'), rule='class_gmm')
  summary = score.score_files(
    str(tmp_path / 'd'), losses=str(tmp_path / 'losses.npy'), statistic='last_loss'
  )
  assert summary['detector'] == {'statistic': 'last_loss', 'rule': 'gmm'}
  assert not (tmp_path / 'a').exists()  # A refused choice writes nothing.


BAD_FILES = {
  'missing file': (None, 'does not exist'),
  'nan loss': (np.array([[1.0, np.nan], [1.0, 2.0]]), 'entry (0, 1) is not finite'),
  '3-d losses': (np.ones((2, 2, 2)), 'expected a non-empty numeric (N, T) array'),
  'text losses': (np.array([['a', 'b']]), 'expected a non-empty numeric (N, T) array'),
}


@pytest.mark.parametrize('case', sorted(BAD_FILES))
def test_bad_loss_files_are_named(case, tmp_path):
  array, message = BAD_FILES[case]
  path = tmp_path / 'losses.npy'
  if array is not None:
    np.save(path, array)
  with pytest.raises(UserInputError, match=re.escape(message)):
    score.score_files(str(tmp_path / 'out'), losses=str(path))
  assert not (tmp_path / 'out').exists()


def _npz_bytes() -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, losses=np.ones((4, 3)))
  return buffer.getvalue()


# (file name, its bytes or None for a directory, what the message must say it is)
UNREADABLE_FILES = {
  'directory': ('losses.npy', None, 'is a directory'),
  'text named .npy': ('losses.npy', b'epoch,loss\n1,2\n', 'is a text file'),
  'text named .npz': ('losses.npz', b'hello\n', 'is a text file'),
  'truncated npz': ('losses.npz', _npz_bytes()[:100], 'is a zip (.npz) archive that is truncated'),
  'truncated npy': ('losses.npy', b'\x93NUMPY\x01\x00', 'is an .npy array that is truncated'),
  'empty': ('losses.npy', b'', 'is empty'),
}


@pytest.mark.parametrize('case', sorted(UNREADABLE_FILES))
def test_unreadable_files_say_what_they_are(case, tmp_path):
  name, payload, message = UNREADABLE_FILES[case]
  path = tmp_path / name
  if payload is None:
    path.mkdir()
  else:
    path.write_bytes(payload)
  with pytest.raises(UserInputError, match=re.escape(f'losses file {path} {message}')):
    score.score_files(str(tmp_path / 'out'), losses=str(path))
  assert not (tmp_path / 'out').exists()


def test_bad_labels_and_truth_are_named(tmp_path):
  np.save(tmp_path / 'logits.npy', np.zeros((2, 3, 4), np.float32))
  np.save(tmp_path / 'labels.npy', np.array([0, 4, 1]))
  with pytest.raises(
    UserInputError, match=re.escape('label 4 at index 1, out of range; expected 0..3')
  ):
    score.score_files(
      str(tmp_path / 'out'),
      logits=str(tmp_path / 'logits.npy'),
      labels=str(tmp_path / 'labels.npy'),
    )
  np.save(tmp_path / 'losses.npy', np.ones((3, 2)))
  np.save(tmp_path / 'truth.npy', np.array([0, 1]))
  with pytest.raises(UserInputError, match='2 entries, expected 3'):
    score.score_files(
      str(tmp_path / 'out'), losses=str(tmp_path / 'losses.npy'), truth=str(tmp_path / 'truth.npy')
    )
  with pytest.raises(UserInputError, match='--logits needs --labels'):
    score.score_files(str(tmp_path / 'out'), logits=str(tmp_path / 'logits.npy'))


def test_pred_probs_for_cleanlab_have_our_label_quality_as_self_confidence():
  labels = np.array([0, 2, 1, 2])
  quality = np.array([0.9, 0.1, 0.5, 1.0])
  pred_probs = report.as_pred_probs(labels, quality, num_classes=3)
  np.testing.assert_allclose(pred_probs.sum(1), 1.0)
  np.testing.assert_allclose(pred_probs[np.arange(4), labels], quality)
  np.testing.assert_allclose(pred_probs[1], [0.45, 0.45, 0.1])


def _long_rows(losses, ids, labels=None, seed=0):
  """One `id,epoch,loss[,label]` row per measurement, in a shuffled order."""
  rows = [
    [ids[i], t, repr(float(losses[i, t]))] + ([] if labels is None else [int(labels[i])])
    for i in range(len(losses))
    for t in range(losses.shape[1])
  ]
  order = np.random.default_rng(seed).permutation(len(rows))
  return [rows[j] for j in order]


def _write_csv(path, header, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_the_long_format_with_string_ids_scores_like_the_array(tmp_path):
  losses, truth = _trajectories(num_examples=120, num_epochs=5)
  labels = np.arange(120) % 3
  ids = [f'img,{i:03d}' if i % 7 == 0 else f'img_{i:03d}' for i in range(120)]  # Sorted order
  _write_csv(
    tmp_path / 'long.csv', ['id', 'epoch', 'loss', 'label'], _long_rows(losses, ids, labels)
  )
  score.score_files(str(tmp_path / 'long'), losses=str(tmp_path / 'long.csv'))
  order = np.argsort(ids)  # Examples are in sorted id order.
  np.save(tmp_path / 'wide.npy', losses[order])
  np.save(tmp_path / 'labels.npy', labels[order])
  score.score_files(
    str(tmp_path / 'wide'), losses=str(tmp_path / 'wide.npy'), labels=str(tmp_path / 'labels.npy')
  )
  with open(tmp_path / 'long' / 'scores.csv') as f:
    long_rows = list(csv.DictReader(f))
  with open(tmp_path / 'wide' / 'scores.csv') as f:
    wide_rows = list(csv.DictReader(f))
  assert [r['id'] for r in long_rows] == [ids[i] for i in order]
  for long_row, wide_row in zip(long_rows, wide_rows, strict=True):
    assert {k: v for k, v in long_row.items() if k != 'id'} == wide_row
  with open(tmp_path / 'long' / 'ranked_issues.csv') as f:
    ranked = list(csv.DictReader(f))
  assert all(r['id'] == ids[order[int(r['index'])]] for r in ranked)


def test_long_format_integer_ids_0_to_n_need_no_id_column(tmp_path):
  losses, _ = _trajectories(num_examples=30, num_epochs=3)
  _write_csv(
    tmp_path / 'long.csv',
    ['epoch', 'id', 'loss'],
    [[t, i, loss] for i, t, loss in _long_rows(losses, range(30))],
  )
  loaded, labels, ids = score.load_losses(str(tmp_path / 'long.csv'))
  np.testing.assert_allclose(loaded, losses)
  assert labels is None and ids is None


@pytest.mark.parametrize(
  'rows, message',
  [
    ([['a', 0, 1.0], ['a', 0, 2.0], ['a', 1, 1.0]], 'example a has more than one loss at epoch 0'),
    ([['a', 0, 1.0], ['b', 0, 1.0], ['a', 1, 1.0]], 'example b has no loss at epoch 1'),
    ([['a', 0, 'high']], "line 2: loss 'high' is not a number"),
    ([['a', 'first', 1.0]], "line 2: epoch 'first' is not an integer"),
    ([['a', 0]], r'line 2: 2 values, expected 3 \(id,epoch,loss\)'),
    ([['a', 0, 'nan']], r'entry \(0, 0\) is not finite'),
  ],
)
def test_bad_long_files_are_named(rows, message, tmp_path):
  _write_csv(tmp_path / 'long.csv', ['id', 'epoch', 'loss'], rows)
  with pytest.raises(UserInputError, match=message):
    score.load_losses(str(tmp_path / 'long.csv'))


def test_long_labels_come_once(tmp_path):
  _write_csv(
    tmp_path / 'two.csv', ['id', 'epoch', 'loss', 'label'], [['a', 0, 1.0, 1], ['a', 1, 1.0, 2]]
  )
  with pytest.raises(UserInputError, match='example a has two labels'):
    score.load_losses(str(tmp_path / 'two.csv'))
  _write_csv(tmp_path / 'own.csv', ['id', 'epoch', 'loss'], [['a', 0, 1.0], ['b', 0, 1.0]])
  np.save(tmp_path / 'labels.npy', np.array([0, 1]))
  with pytest.raises(UserInputError, match='with its own ids: give the labels as its label column'):
    score.load_losses(str(tmp_path / 'own.csv'), labels_path=str(tmp_path / 'labels.npy'))


def test_npy_logits_are_memory_mapped_and_read_epoch_by_epoch(tmp_path):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 40, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 40)
  np.save(tmp_path / 'logits.npy', logits)
  np.save(tmp_path / 'labels.npy', labels)
  mapped, _ = score.load_logits(str(tmp_path / 'logits.npy'), str(tmp_path / 'labels.npy'))
  assert isinstance(mapped, np.memmap)
  for name, value in api.statistics_from_logits(mapped, labels).items():
    np.testing.assert_array_equal(value, api.statistics_from_logits(logits, labels)[name])
