"""The Python entry point: `find_label_issues` on arrays a user already has.

  issues = aul_jax.find_label_issues(labels_N, logits=logits_TxNxK)   # every epoch's logits
  issues = aul_jax.find_label_issues(labels_N, losses=losses_NxT)     # or only the losses
  issues.ranked_indices      # flagged examples, most suspicious first
  issues.to_dataframe()      # one row per example (needs pandas)

It runs the detectors of a training run (`aul_jax.detectors`) on the statistics that the
training run's accumulators give (`aul_jax.dynamics`), draws no figures and writes no file;
`aul_jax.score` is the same on files, with every output of a run. `aul_jax.Recorder` records
the statistics inside a training loop instead of keeping every epoch's logits.
"""

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from aul_jax import checks, detectors, dynamics, losses, report
from aul_jax import config as config_lib
from aul_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class LabelIssues:
  """Which given labels look wrong, and how sure the detector is; (N,) arrays."""

  labels_N: np.ndarray  # The given labels.
  is_label_issue_N: np.ndarray  # bool: flagged, p(mislabeled) > 0.5.
  score_N: np.ndarray  # Higher = more likely mislabeled (the detector's statistic).
  p_mislabeled_N: np.ndarray  # The rule's p(mislabeled) (0/1 for the sign rule).
  label_quality_N: np.ndarray  # cleanlab's: lower = more likely mislabeled; ranks the issues.
  noise_estimate: float  # The rule's estimate of the fraction mislabeled.
  suggested_label_N: np.ndarray | None  # The class most often out-scoring the given one.
  statistics: dict  # Every per-example statistic (`dynamics.statistics`, and the AUL).
  statistic: str  # The detector that ran (`aul_jax.detectors`).
  rule: str

  @property
  def ranked_indices(self) -> np.ndarray:
    """Indices of the flagged examples, lowest label quality (most suspicious) first, ties
    by index: the top of ranked_issues.csv."""
    order = report.quality_order(self.label_quality_N)
    return order[self.is_label_issue_N[order]]

  def to_dataframe(self):
    """A pandas DataFrame, one row per example: label, verdict, score and statistics."""
    try:
      import pandas as pd
    except ImportError:
      raise ImportError('LabelIssues.to_dataframe needs pandas: pip install pandas') from None
    columns = {
      'label': self.labels_N,
      'is_label_issue': self.is_label_issue_N,
      'score': self.score_N,
      'p_mislabeled': self.p_mislabeled_N,
      'label_quality': self.label_quality_N,
    }
    if self.suggested_label_N is not None:
      columns['suggested_label'] = self.suggested_label_N
    columns.update({k: v for k, v in self.statistics.items() if k != 'suggested_label'})
    return pd.DataFrame(columns)


def default_detector(has_logits: bool) -> tuple[str, str]:
  """(statistic, rule): a full run's default with logits; the paper's with losses alone."""
  return ('aum', 'sign') if has_logits else ('aul', 'gmm')


def check_losses(losses_NxT, where: str = 'losses') -> np.ndarray:
  """(N, T) float64 per-epoch losses ((N,) is one epoch), finite, or UserInputError."""
  losses_NxT = np.asarray(losses_NxT)
  if losses_NxT.ndim == 1:
    losses_NxT = losses_NxT[:, None]
  if losses_NxT.ndim != 2 or losses_NxT.size == 0 or not np.issubdtype(losses_NxT.dtype, np.number):
    raise UserInputError(
      f'{where}: expected a non-empty numeric (N, T) array, got shape {losses_NxT.shape} of '
      f'{losses_NxT.dtype}'
    )
  _check_finite(losses_NxT, where)
  return losses_NxT.astype(np.float64)


def check_logits(logits_TxNxK, where: str = 'logits') -> np.ndarray:
  """(T, N, K) float per-epoch logits, finite, or UserInputError."""
  logits_TxNxK = np.asanyarray(logits_TxNxK)  # A memmap stays one.
  if (
    logits_TxNxK.ndim != 3
    or 0 in logits_TxNxK.shape
    or not np.issubdtype(logits_TxNxK.dtype, np.floating)
  ):
    raise UserInputError(
      f'{where}: expected a float (T, N, K) array, got shape {logits_TxNxK.shape} of '
      f'{logits_TxNxK.dtype}'
    )
  _check_finite(logits_TxNxK, where)
  return logits_TxNxK


def _check_finite(array: np.ndarray, where: str, block: int = 1 << 22) -> None:
  """Every entry finite, checked a block of rows at a time (a memory-mapped file stays on disk)."""
  rows = max(1, block // max(1, int(np.prod(array.shape[1:]))))
  for start in range(0, len(array), rows):
    bad = np.argwhere(~np.isfinite(array[start : start + rows]))
    if len(bad):
      first = (int(bad[0][0]) + start, *bad[0][1:].tolist())
      raise UserInputError(f'{where}: entry {first} is not finite')


def fold_logits(logits_TxNxK, labels_N) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(statistics, losses): the AUL and every `dynamics.statistics` of (T, N, K) per-epoch
  logits as (N,) arrays, and each epoch's loss as (N, T) float64, in one pass folded epoch by
  epoch exactly as a training run folds them (so the logits may be a memory-mapped file)."""
  labels = jnp.asarray(labels_N)

  @functools.partial(jax.jit, donate_argnums=0)
  def fold(state, logits_NxK):
    aul_N, dyn = state
    logits_NxK = logits_NxK.astype(jnp.float32)
    loss_N = losses.cross_entropy(logits_NxK, labels)
    epoch = {'loss': loss_N, **dynamics.per_example(logits_NxK, labels)}
    epoch = {k: v.astype(jnp.float32) for k, v in epoch.items()}
    return (aul_N + loss_N, dynamics.add_epoch(dyn, epoch)), loss_N

  state = (jnp.zeros(len(labels_N), jnp.float32), dynamics.init_dynamics(len(labels_N)))
  loss_TxN = []
  for logits_NxK in logits_TxNxK:
    state, loss_N = fold(state, jnp.asarray(logits_NxK))
    loss_TxN.append(loss_N)
  aul_N, dyn = state
  stats = {'aul': aul_N, **dynamics.statistics(dyn)}
  stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  return stats, np.stack([np.asarray(v) for v in loss_TxN], axis=1).astype(np.float64)


def statistics_from_logits(logits_TxNxK, labels_N) -> dict[str, np.ndarray]:
  """The statistics of `fold_logits`."""
  return fold_logits(logits_TxNxK, labels_N)[0]


def losses_from_logits(logits_TxNxK, labels_N) -> np.ndarray:
  """Per-epoch softmax cross-entropy of each example's given label (the training run's
  `losses.cross_entropy`), as (N, T) float64: the losses of `fold_logits`."""
  return fold_logits(logits_TxNxK, labels_N)[1]


def statistics_from_losses(losses_NxT) -> dict[str, np.ndarray]:
  """What losses alone give: the AUL and the last epoch's loss."""
  return {'aul': losses_NxT.sum(axis=1), 'last_loss': losses_NxT[:, -1]}


def detect(
  statistics: Mapping, labels_N, statistic: str, rule: str, mixture: Mapping, logits='logits='
):
  """`detectors.detect`, its failures as UserInputError that name what is missing (the
  `logits` a statistic needs: the argument, or the scorer's --logits)."""
  if rule == 'class_gmm' and labels_N is None:
    raise UserInputError('rule class_gmm fits one mixture per given label: give labels')
  num_classes = None if labels_N is None else int(np.max(labels_N)) + 1
  try:
    verdict = detectors.detect(
      statistics, labels_N, num_classes, statistic=statistic, rule=rule, mixture=mixture
    )
  except KeyError as e:
    raise UserInputError(f'statistic {statistic!r} needs {logits} (it uses {e})') from None
  except ValueError as e:
    raise UserInputError(str(e)) from None
  return jax.tree.map(np.asarray, verdict)


def find_label_issues(
  labels,
  *,
  losses=None,
  logits=None,
  statistics: Mapping | None = None,
  statistic: str | None = None,
  rule: str | None = None,
  mixture: Mapping = config_lib.MIXTURE,
) -> LabelIssues:
  """The label issues of one training run, from exactly one of:

  - `logits`: (T, N, K) every epoch's logits (numpy or JAX), giving every statistic;
  - `losses`: (N, T) every epoch's per-example losses, giving the AUL and the last loss;
  - `statistics`: per-example statistics already accumulated (`Recorder.statistics`).

  `statistic` and `rule` pick the detector (`aul_jax.detectors`); by default a negative AUM
  with logits, the paper's AUL mixture with losses alone (as `aul_jax.score`).
  """
  inputs = {'losses': losses, 'logits': logits, 'statistics': statistics}
  given = [name for name, x in inputs.items() if x is not None]
  if len(given) != 1:
    raise UserInputError(
      f'find_label_issues takes exactly one of losses=, logits= or statistics=; got '
      f'{", ".join(given) or "none"}'
    )
  if logits is not None:
    logits = check_logits(logits)
    count, num_classes = logits.shape[1], logits.shape[2]
  elif losses is not None:
    losses = check_losses(losses)
    count, num_classes = len(losses), None
  else:
    count, num_classes = len(np.asarray(statistics['aul'])), None
  labels_N = checks.class_labels(
    labels,
    'labels',
    count=count,
    count_of=f'there are {count} examples',
    num_classes=num_classes,
    integral_floats=True,
  ).astype(np.int64)
  if logits is not None:
    statistics = statistics_from_logits(logits, labels_N)
  elif losses is not None:
    statistics = statistics_from_losses(losses)
  statistics = {k: np.asarray(v, np.float64) for k, v in statistics.items()}
  default_statistic, default_rule = default_detector('aum' in statistics)
  statistic = statistic or default_statistic
  rule = rule or (default_rule if statistic == default_statistic else 'gmm')
  verdict = detect(statistics, labels_N, statistic, rule, mixture)
  suggested = statistics.get('suggested_label')
  return LabelIssues(
    labels_N=labels_N,
    is_label_issue_N=verdict.flagged_N,
    score_N=np.asarray(verdict.score_N, np.float64),
    p_mislabeled_N=np.asarray(verdict.p_mislabeled_N, np.float64),
    label_quality_N=report.label_quality(
      verdict.p_mislabeled_N, verdict.score_N, hard=verdict.mixture is None
    ),
    noise_estimate=float(verdict.noise_estimate),
    suggested_label_N=None if suggested is None else suggested.astype(np.int64),
    statistics=statistics,
    statistic=statistic,
    rule=rule,
  )
