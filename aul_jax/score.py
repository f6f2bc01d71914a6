"""Scores loss trajectories from any framework: `python -m aul_jax.score --losses FILE ...`.

For PyTorch or TensorFlow users who only want the detector: give per-example training
losses per epoch (or per-epoch logits and labels), get the same scores.csv,
summary.json, ranked_issues.csv and figures as a full aul_jax run.

  python -m aul_jax.score --losses losses.npy --workdir out          # (N, T) array
  python -m aul_jax.score --losses losses.csv --workdir out          # one row per example
  python -m aul_jax.score --logits logits.npy --labels y.npy --workdir out  # (T, N, K)
  ... --truth is_mislabeled.npy   # adds AUROC, precision, recall and F1
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from aul_jax import config as config_lib
from aul_jax import figures, gmm, outputs, report
from aul_jax.errors import UserInputError


def _load_array(path: str, what: str) -> np.ndarray:
  """An .npy, .npz (single array) or .csv file as a numpy array."""
  if not os.path.isfile(path):
    raise UserInputError(f'{what} file {path} does not exist')
  try:
    if path.endswith('.csv'):
      return _load_csv(path)
    loaded = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise UserInputError(f'{what} file {path} cannot be read: {e}') from None
  if isinstance(loaded, np.lib.npyio.NpzFile):
    with loaded:
      if len(loaded.files) != 1:
        raise UserInputError(
          f'{what} file {path} holds {len(loaded.files)} arrays ({", ".join(loaded.files)}); '
          'expected exactly one'
        )
      return loaded[loaded.files[0]]
  return loaded


def _load_csv(path: str) -> np.ndarray:
  """Numeric CSV, one row per example; a header line, if present, is skipped."""
  try:
    return np.loadtxt(path, delimiter=',', dtype=np.float64, ndmin=2)
  except ValueError:
    return np.loadtxt(path, delimiter=',', dtype=np.float64, ndmin=2, skiprows=1)


def _check_finite(array: np.ndarray, path: str, what: str) -> None:
  bad = np.argwhere(~np.isfinite(array))
  if len(bad):
    raise UserInputError(f'{what} file {path}: entry {tuple(bad[0].tolist())} is not finite')


def losses_from_logits(logits_TxNxK: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """Per-epoch softmax cross-entropy of each example's given label, as (N, T)."""
  log_p = jax.nn.log_softmax(jnp.asarray(logits_TxNxK, jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_p, jnp.asarray(labels_N)[None, :, None], axis=-1)[..., 0]
  return np.asarray(-picked).T


def load_losses(losses_path=None, logits_path=None, labels_path=None):
  """(losses (N, T) float, labels (N,) or None) from the user's files, validated."""
  if (losses_path is None) == (logits_path is None):
    raise UserInputError('give either --losses, or --logits together with --labels')
  if losses_path is not None:
    losses = _load_array(losses_path, 'losses')
    if losses.ndim == 1:
      losses = losses[:, None]  # One epoch.
    if losses.ndim != 2 or losses.size == 0 or not np.issubdtype(losses.dtype, np.number):
      raise UserInputError(
        f'losses file {losses_path}: expected a non-empty numeric (N, T) array, got '
        f'shape {losses.shape} of {losses.dtype}'
      )
    _check_finite(losses, losses_path, 'losses')
    labels = None if labels_path is None else _load_labels(labels_path, len(losses), None)
    return losses.astype(np.float64), labels
  if labels_path is None:
    raise UserInputError('--logits needs --labels (the given label of each example)')
  logits = _load_array(logits_path, 'logits')
  if logits.ndim != 3 or 0 in logits.shape or not np.issubdtype(logits.dtype, np.floating):
    raise UserInputError(
      f'logits file {logits_path}: expected a float (T, N, K) array, got shape {logits.shape} '
      f'of {logits.dtype}'
    )
  _check_finite(logits, logits_path, 'logits')
  labels = _load_labels(labels_path, logits.shape[1], logits.shape[2])
  return losses_from_logits(logits, labels).astype(np.float64), labels


def _load_labels(path: str, num_examples: int, num_classes: int | None) -> np.ndarray:
  labels = _load_array(path, 'labels')
  labels = labels.reshape(-1) if labels.ndim == 2 and 1 in labels.shape else labels
  if labels.shape != (num_examples,):
    raise UserInputError(f'labels file {path}: shape {labels.shape}, expected ({num_examples},)')
  if not np.issubdtype(labels.dtype, np.integer):
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise UserInputError(f'labels file {path}: labels must be integers, got {labels.dtype}')
  labels = labels.astype(np.int64)
  top = num_classes if num_classes is not None else np.iinfo(np.int32).max
  bad = np.flatnonzero((labels < 0) | (labels >= top))
  if len(bad):
    raise UserInputError(
      f'labels file {path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{top - 1}'
    )
  return labels


def load_truth(path: str, num_examples: int) -> np.ndarray:
  """A ground-truth mislabeled mask: booleans, or 0/1 integers, one per example."""
  truth = _load_array(path, 'truth').reshape(-1)
  if truth.shape != (num_examples,):
    raise UserInputError(f'truth file {path}: {truth.size} entries, expected {num_examples}')
  if truth.dtype != bool and not np.isin(truth, (0, 1)).all():
    raise UserInputError(f'truth file {path}: expected booleans or 0/1 values')
  return truth.astype(bool)


def score(losses_NxT: np.ndarray, *, labels_N=None, is_mislabeled_N=None, max_iter=1000, tol=1e-7):
  """AUL, the 2-component mixture and every output file's contents for given trajectories.

  Returns (scores columns, summary, figures) ready for `outputs.write_run_outputs`.
  """
  aul_N = np.asarray(losses_NxT, np.float64).sum(axis=1)
  mixture = gmm.sort_by_mean(gmm.fit(jnp.asarray(aul_N, jnp.float32), max_iter=max_iter, tol=tol))
  p_N = np.asarray(gmm.mislabel_probability(mixture, jnp.asarray(aul_N, jnp.float32)))
  mixture = jax.tree.map(np.asarray, mixture)
  columns = report.detection_columns(aul_N, p_N)
  scores = {'index': np.arange(len(aul_N))}
  if labels_N is not None:
    scores['label'] = labels_N
  scores.update(columns)
  if is_mislabeled_N is not None:
    scores['is_mislabeled'] = is_mislabeled_N
  summary = {'n_train': len(aul_N), 'n_epochs': losses_NxT.shape[1]}
  estimate = gmm.noise_fraction(mixture)
  summary.update(report.detection_summary(estimate, mixture, columns, is_mislabeled_N))
  pictures = figures.run_figures(
    aul_N=aul_N,
    mixture=mixture,
    is_mislabeled_N=is_mislabeled_N,
    history_NxT=np.asarray(losses_NxT, np.float32),
  )
  return scores, summary, pictures


def score_files(workdir: str, *, losses=None, logits=None, labels=None, truth=None) -> dict:
  """Reads the files, scores them and writes the outputs into `workdir`; returns the summary."""
  config_lib.check_workdir(workdir)
  losses_NxT, labels_N = load_losses(losses, logits, labels)
  truth_N = None if truth is None else load_truth(truth, len(losses_NxT))
  scores, summary, pictures = score(losses_NxT, labels_N=labels_N, is_mislabeled_N=truth_N)
  summary['inputs'] = {'losses': losses, 'logits': logits, 'labels': labels, 'truth': truth}
  outputs.write_run_outputs(
    workdir, scores, summary, None, pictures, {'ranked_issues.csv': report.ranked_issues(scores)}
  )
  return summary


_LOSSES = flags.DEFINE_string('losses', None, '(N, T) per-example losses: .npy, .npz or .csv.')
_LOGITS = flags.DEFINE_string('logits', None, '(T, N, K) per-epoch logits: .npy or .npz.')
_LABELS = flags.DEFINE_string('labels', None, '(N,) given labels, needed with --logits.')
_TRUTH = flags.DEFINE_string('truth', None, '(N,) known mislabeled mask, for metrics.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the outputs.')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    summary = score_files(
      _WORKDIR.value,
      losses=_LOSSES.value,
      logits=_LOGITS.value,
      labels=_LABELS.value,
      truth=_TRUTH.value,
    )
  except UserInputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(
    f'{summary["n_train"]} examples, noise estimate {summary["noise_estimate"]:.3f}, '
    f'{summary["n_flagged"]} flagged; outputs in {_WORKDIR.value}'
  )
  return 0


if __name__ == '__main__':
  app.run(main)
