"""Scores loss trajectories from any framework: `python -m aul_jax.score --losses FILE ...`.

For PyTorch or TensorFlow users who only want the detector: give per-example training
losses per epoch (or per-epoch logits and labels), get the same scores.csv,
summary.json, ranked_issues.csv and figures as a full aul_jax run. Losses alone give the
AUL and the paper's mixture; logits also give the AUM and the other training dynamics,
and then the default detector of a full run (a negative AUM; docs/detection.md).

  python -m aul_jax.score --losses losses.npy --workdir out          # (N, T) array
  python -m aul_jax.score --losses losses.csv --workdir out          # one row per example
  python -m aul_jax.score --losses long.csv --workdir out   # id,epoch,loss[,label] rows
  python -m aul_jax.score --logits logits.npy --labels y.npy --workdir out  # (T, N, K)
  ... --truth is_mislabeled.npy   # adds AUROC, precision, recall and F1
  ... --statistic=aul --rule=gmm   # another detector (aul_jax.detectors)
"""

import csv
import os
import sys
import zipfile

import jax
import numpy as np
from absl import app, flags

from aul_jax import api, checks, cli, detectors, figures, outputs, report
from aul_jax import config as config_lib
from aul_jax import workdir as workdir_lib
from aul_jax.errors import UserInputError


def _load_array(path: str, what: str) -> np.ndarray:
  """An .npy, .npz (single array) or .csv file as a numpy array."""
  if not os.path.isfile(path):
    raise UserInputError(f'{what} file {path} {checks.unreadable(path, "a file")}')
  try:
    if path.endswith('.csv'):
      return _load_csv(path)
    # Memory-mapped: the scorer reads (T, N, K) logits one epoch at a time (aul_jax.api).
    loaded = np.load(path, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    why = checks.unreadable(path, 'an .npy, .npz or .csv file')
    if why.startswith('is an .npy') or why.startswith('is a zip'):
      why = f'{why} ({e})'
    raise UserInputError(f'{what} file {path} {why}') from None
  if isinstance(loaded, np.lib.npyio.NpzFile):
    with loaded:
      if len(loaded.files) != 1:
        raise UserInputError(
          f'{what} file {path} holds {len(loaded.files)} arrays ({", ".join(loaded.files)}); '
          'expected exactly one'
        )
      try:
        return loaded[loaded.files[0]]
      except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserInputError(f'{what} file {path}: its array cannot be read ({e})') from None
  return loaded


LONG_COLUMNS = ('id', 'epoch', 'loss')  # The long format's columns; 'label' is optional.


def _long_header(path: str) -> list[str] | None:
  """The header of a long-format CSV (columns id, epoch, loss and maybe label), else None."""
  with open(path, newline='') as f:
    first = next(csv.reader(f), [])
  names = [name.strip().lower() for name in first]
  return names if set(LONG_COLUMNS) <= set(names) else None


def load_long_csv(path: str, names: list[str]):
  """(losses (N, T), ids (N,) or None, labels (N,) or None) from one `id,epoch,loss[,label]`
  row per measurement. Examples are in sorted id order; ids may be strings. `ids` is None
  when they are 0..N-1 already."""
  column = {name: names.index(name) for name in (*LONG_COLUMNS, 'label') if name in names}
  rows = {name: [] for name in column}
  with open(path, newline='') as f:
    reader = csv.reader(f)
    next(reader)
    for line, row in enumerate(reader, start=2):
      if not row:
        continue
      try:
        for name, i in column.items():
          rows[name].append(row[i].strip())
      except IndexError:
        raise UserInputError(
          f'losses file {path}, line {line}: {len(row)} values, expected {len(names)} '
          f'({",".join(names)})'
        ) from None
  if not rows['id']:
    raise UserInputError(f'losses file {path} has a header but no rows')
  int_ids = _numbers_if_all(rows['id'], int)
  epochs = _parsed(rows['epoch'], int, 'epoch', 'an integer', path)
  values = _parsed(rows['loss'], float, 'loss', 'a number', path)
  unique_ids, example = np.unique(
    np.asarray(rows['id'] if int_ids is None else int_ids), return_inverse=True
  )
  unique_epochs, epoch = np.unique(np.asarray(epochs), return_inverse=True)
  count_NxT = np.zeros((len(unique_ids), len(unique_epochs)), np.int64)
  np.add.at(count_NxT, (example, epoch), 1)
  for problem, where in (
    ('has more than one loss', count_NxT > 1),
    ('has no loss', count_NxT == 0),
  ):
    if where.any():
      i, t = np.argwhere(where)[0]
      raise UserInputError(
        f'losses file {path}: example {unique_ids[i]} {problem} at epoch {unique_epochs[t]}; '
        'every example needs exactly one loss per epoch'
      )
  losses_NxT = np.zeros(count_NxT.shape, np.float64)
  losses_NxT[example, epoch] = values
  labels_N = None
  if 'label' in rows:
    given = _parsed(rows['label'], int, 'label', 'an integer class', path)
    labels_N = np.full(len(unique_ids), -1, np.int64)
    labels_N[example] = given
    if np.any(labels_N[example] != np.asarray(given)):
      i = example[np.flatnonzero(labels_N[example] != np.asarray(given))[0]]
      raise UserInputError(f'losses file {path}: example {unique_ids[i]} has two labels')
  natural = int_ids is not None and np.array_equal(unique_ids, np.arange(len(unique_ids)))
  return losses_NxT, None if natural else unique_ids, labels_N


def _parsed(values: list[str], kind, name: str, expected: str, path: str) -> list:
  """`values` as `kind`, or an error naming the first line that does not parse."""
  parsed = _numbers_if_all(values, kind)
  if parsed is None:
    for i, value in enumerate(values):
      if _numbers_if_all([value], kind) is None:
        raise UserInputError(
          f'losses file {path}, line {i + 2}: {name} {value!r} is not {expected}'
        )
  return parsed


def _numbers_if_all(values: list[str], kind):
  """`values` as `kind` (int or float) if every one parses, else None."""
  try:
    return [kind(v) for v in values]
  except ValueError:
    return None


def _load_csv(path: str) -> np.ndarray:
  """Numeric CSV, one row per example; a header line, if present, is skipped."""
  try:
    return np.loadtxt(path, delimiter=',', dtype=np.float64, ndmin=2)
  except ValueError:
    return np.loadtxt(path, delimiter=',', dtype=np.float64, ndmin=2, skiprows=1)


def load_logits(logits_path: str, labels_path: str | None):
  """((T, N, K) float logits, (N,) labels) from the user's files, validated."""
  if labels_path is None:
    raise UserInputError('--logits needs --labels (the given label of each example)')
  logits = api.check_logits(_load_array(logits_path, 'logits'), f'logits file {logits_path}')
  return logits, _load_labels(labels_path, logits.shape[1], logits.shape[2])


def load_losses(losses_path=None, logits_path=None, labels_path=None):
  """(losses (N, T) float, labels (N,) or None, the user's ids (N,) or None) from the user's
  files, validated. A CSV with columns id, epoch, loss (and label) is the long format."""
  if (losses_path is None) == (logits_path is None):
    raise UserInputError('give either --losses, or --logits together with --labels')
  if losses_path is None:
    logits, labels = load_logits(logits_path, labels_path)
    return api.losses_from_logits(logits, labels), labels, None
  where = f'losses file {losses_path}'
  header = None
  if losses_path.endswith('.csv') and os.path.isfile(losses_path):
    header = _long_header(losses_path)
  if header is None:
    losses = api.check_losses(_load_array(losses_path, 'losses'), where)
    labels = None if labels_path is None else _load_labels(labels_path, len(losses), None)
    return losses, labels, None
  losses, ids, labels = load_long_csv(losses_path, header)
  if labels_path is not None:
    if labels is not None or ids is not None:
      has = 'a label column' if labels is not None else 'its own ids'
      raise UserInputError(
        f'{where} is in the long format with {has}: give the labels as its label column, '
        'not --labels'
      )
    labels = _load_labels(labels_path, len(losses), None)
  elif labels is not None:
    labels = checks.class_labels(labels, f'{where} label column').astype(np.int64)
  return api.check_losses(losses, where), labels, ids


def _load_labels(path: str, num_examples: int, num_classes: int | None) -> np.ndarray:
  labels = _load_array(path, 'labels')
  labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[0] == 1 else labels
  return checks.class_labels(
    labels,
    f'labels file {path}',
    count=num_examples,
    count_of=f'there are {num_examples} examples',
    num_classes=num_classes,
    integral_floats=True,
  ).astype(np.int64)


def load_truth(path: str, num_examples: int) -> np.ndarray:
  """A ground-truth mislabeled mask: booleans, or 0/1 integers, one per example."""
  truth = _load_array(path, 'truth').reshape(-1)
  if truth.shape != (num_examples,):
    raise UserInputError(f'truth file {path}: {truth.size} entries, expected {num_examples}')
  if truth.dtype != bool and not np.isin(truth, (0, 1)).all():
    raise UserInputError(f'truth file {path}: expected booleans or 0/1 values')
  return truth.astype(bool)


def score(
  losses_NxT: np.ndarray,
  *,
  labels_N=None,
  is_mislabeled_N=None,
  statistics=None,
  statistic='aul',
  rule='gmm',
  mixture=config_lib.MIXTURE,
  ids_N=None,
):
  """The detector `statistic` + `rule` and every output file's contents for given
  trajectories.

  `statistics` (from `api.fold_logits`) holds the dynamics when logits were given;
  without them only the AUL ('aul') and the last loss ('last_loss') are known. `ids_N`, the
  user's own example ids, become an `id` column. Returns
  (scores columns, summary, tables, figures) ready for `outputs.write_run_outputs`.
  """
  losses_NxT = np.asarray(losses_NxT, np.float64)
  aul_N = losses_NxT.sum(axis=1)
  if statistics is None:
    statistics = api.statistics_from_losses(losses_NxT)
  verdict = api.detect(statistics, labels_N, statistic, rule, mixture, logits='--logits')
  paper = jax.tree.map(np.asarray, detectors.global_mixture(aul_N, **mixture))
  scores, summary, tables = report.assemble(
    num_examples=len(aul_N),
    labels_N=labels_N,
    statistics=statistics,
    verdict=verdict,
    detector={'statistic': statistic, 'rule': rule},
    paper=paper,
    is_mislabeled_N=is_mislabeled_N,
    ids_N=ids_N,
    n_epochs=losses_NxT.shape[1],
  )
  pictures = figures.run_figures(
    aul_N=aul_N,
    mixture=paper.mixture,
    is_mislabeled_N=is_mislabeled_N,
    history_NxT=np.asarray(losses_NxT, np.float32),
  )
  return scores, summary, tables, pictures


def score_files(
  workdir: str, *, losses=None, logits=None, labels=None, truth=None, statistic=None, rule=None
) -> dict:
  """Reads the files, scores them and writes the outputs into `workdir`; returns the summary.

  `statistic` and `rule` default to `default_detector` of what was given.
  """
  config_lib.check_workdir(workdir)
  workdir_lib.refuse_other_kind(workdir, 'scoring')  # Before the work; again under the lock.
  statistics, ids_N = None, None
  if logits is None or losses is not None:
    losses_NxT, labels_N, ids_N = load_losses(losses, logits, labels)  # Refuses both at once.
  else:
    logits_TxNxK, labels_N = load_logits(logits, labels)
    statistics, losses_NxT = api.fold_logits(logits_TxNxK, labels_N)  # One pass over them.
  default_statistic, default_rule = api.default_detector(statistics is not None)
  statistic = statistic or default_statistic
  rule = rule or (default_rule if statistic == default_statistic else 'gmm')
  if rule == 'class_gmm' and labels_N is None:
    raise UserInputError('rule class_gmm fits one mixture per given label: give --labels')
  truth_N = None if truth is None else load_truth(truth, len(losses_NxT))
  scores, summary, tables, pictures = score(
    losses_NxT,
    labels_N=labels_N,
    is_mislabeled_N=truth_N,
    statistics=statistics,
    statistic=statistic,
    rule=rule,
    ids_N=ids_N,
  )
  summary['inputs'] = {'losses': losses, 'logits': logits, 'labels': labels, 'truth': truth}
  with workdir_lib.held(workdir, 'a scoring run'):
    workdir_lib.refuse_other_kind(workdir, 'scoring')
    outputs.write_run_outputs(workdir, scores, summary, None, pictures, tables)
  return summary


_LOSSES = flags.DEFINE_string(
  'losses',
  None,
  '(N, T) per-example losses: .npy, .npz or .csv; or a CSV of id,epoch,loss[,label] rows '
  '(ids may be strings).',
)
_LOGITS = flags.DEFINE_string('logits', None, '(T, N, K) per-epoch logits: .npy or .npz.')
_LABELS = flags.DEFINE_string('labels', None, '(N,) given labels, needed with --logits.')
_TRUTH = flags.DEFINE_string('truth', None, '(N,) known mislabeled mask, for metrics.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the outputs.')
_STATISTIC = flags.DEFINE_string(
  'statistic',
  None,
  'aul, last_loss; with --logits also aum, confidence (default: aum with '
  'logits, else aul). Several, comma-separated, are fit jointly.',
)
_RULE = flags.DEFINE_string(
  'rule', None, 'sign (aum only), gmm or class_gmm (default: sign for aum, else gmm).'
)


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
      statistic=_STATISTIC.value,
      rule=_RULE.value,
    )
  except UserInputError as e:
    print(f'error: {e}', file=sys.stderr)
    return cli.USAGE_ERROR
  print(
    f'{summary["n_train"]} examples, noise estimate {summary["noise_estimate"]:.3f}, '
    f'{summary["n_flagged"]} flagged; outputs in {_WORKDIR.value}'
  )
  return 0


def entry() -> None:
  """The `aul-jax-score` console script and `python -m aul_jax.score`."""
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  entry()
