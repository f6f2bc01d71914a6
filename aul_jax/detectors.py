"""Detectors: which training-dynamics statistics flag an example, and by which rule.

Each statistic is turned into a mislabeling score (higher = more suspicious). Several,
comma-separated ('aum,confidence'), are standardised and fit jointly by a diagonal
mixture. A rule turns scores into p(mislabeled | scores) and a noise-rate estimate:
  sign       AUM only: flagged when the mean margin is negative, i.e. when, averaged over
             training, some other class out-scored the given label; the estimate is the
             flagged fraction and p(mislabeled) is the 0/1 flag. No fit, so no fit to fail:
             it holds where the AUM is not bimodal (80% uniform noise, docs/detection.md);
  gmm        one 2-component Gaussian mixture over all examples (the paper's rule);
  class_gmm  one mixture per given label, so a class whose examples are all harder (or
             a class that absorbs another's flipped labels) gets its own clean and noisy
             modes; the noise estimate is the count-weighted mean of the classes' weights.
  threshold  AUM only: Pleiss et al.'s threshold samples (`aul_jax.threshold_samples`),
             from the extra runs' statistics 'threshold_aum' and 'is_threshold', (R, N) each.
The mislabeled component is the one with the higher (mean standardised) score. `detect` takes
plain arguments, so the pipeline, `aul_jax.score` and library users call it alike.
"""

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aul_jax import config, gmm, threshold_samples

# Mislabeling score of each statistic (higher = more likely mislabeled).
SCORES: dict[str, Callable[[dict], np.ndarray]] = {
  'aul': lambda s: s['aul'],
  'aum': lambda s: -s['aum'],
  'confidence': lambda s: -s['confidence'],
  'last_loss': lambda s: s['last_loss'],
}
RULES = ('sign', 'gmm', 'class_gmm', 'threshold')
# Statistics whose natural decision boundary is a score of 0 (margin = 0: a tie).
SIGNED = ('aum',)
# Rules that judge the AUM of extra training runs (with threshold samples).
EXTRA_RUNS = ('threshold',)


class Verdict(NamedTuple):
  score_N: np.ndarray  # Higher = more likely mislabeled (several: mean standardised score).
  p_mislabeled_N: np.ndarray
  noise_estimate: float
  mixture: gmm.GaussianMixture  # Sorted by mean; per-class rules stack one per class.

  @property
  def flagged_N(self) -> np.ndarray:
    """(N,) bool: the examples the verdict flags, p(mislabeled) > 0.5."""
    return np.asarray(self.p_mislabeled_N) > 0.5


def statistic_names(statistic: str) -> tuple[str, ...]:
  """'aum' -> ('aum',); 'aum,confidence' -> ('aum', 'confidence'); unknown names raise."""
  names = tuple(name.strip() for name in statistic.split(','))
  for name in names:
    if name not in SCORES:
      raise ValueError(f'unknown statistic {name!r}; known: {", ".join(SCORES)}')
  if len(set(names)) != len(names):
    raise ValueError(f'statistic {statistic!r} names a statistic twice')
  return names


def mislabel_score(statistics: dict, statistic: str) -> np.ndarray:
  """(N,) scores of one statistic, or (N, D) of D comma-separated ones."""
  names = statistic_names(statistic)
  columns = [np.asarray(SCORES[name](statistics), np.float64) for name in names]
  return columns[0] if len(columns) == 1 else np.stack(columns, axis=-1)


def _fit(x, weight_N, max_iter: int, tol: float, n_init: int, init: str):
  key = jax.random.key(0) if n_init > 1 or init == 'random' else None
  fitted = gmm.fit(
    x, 2, weights=weight_N, max_iter=max_iter, tol=tol, n_init=n_init, init=init, key=key
  )
  mixture = gmm.sort_by_mean(fitted)
  return mixture, gmm.mislabel_probability(mixture, x)


def _standardise(x_KxC, weight_KxC):
  """Each row's scores (x_KxC: (K, C[, D])) as z-scores over that row's examples of weight 1
  (weight_KxC: 1 or 0); 0 where the weight is 0."""
  weights = weight_KxC.reshape(weight_KxC.shape + (1,) * (x_KxC.ndim - 2))
  count = jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
  mean = jnp.sum(weights * x_KxC, axis=1, keepdims=True) / count
  var = jnp.sum(weights * (x_KxC - mean) ** 2, axis=1, keepdims=True)
  std = jnp.sqrt(jnp.maximum(var / count, 1e-12))
  return jnp.where(weights > 0, (x_KxC - mean) / std, 0.0)


def _class_rows(labels_N: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Each class's example indices as a row of a (K, C) table, C its largest class's count,
  and a (K, C) 0/1 weight marking the real entries (the rest repeat index 0). O(N + K C)
  memory, not the O(K N) of a membership matrix."""
  order = np.argsort(labels_N, kind='stable')
  count_K = np.bincount(labels_N, minlength=num_classes)
  start_K = np.cumsum(count_K) - count_K
  position_C = np.arange(max(int(count_K.max(initial=0)), 1))
  real_KxC = position_C[None] < count_K[:, None]
  at_KxC = np.minimum(start_K[:, None] + position_C[None], len(order) - 1)
  return np.where(real_KxC, order[at_KxC], 0), real_KxC.astype(np.float32)


def _summary_score(score):
  """One ranking score per example: the score itself, or the mean of standardised columns."""
  score = np.asarray(score, np.float64)
  if score.ndim == 1:
    return score
  return np.mean((score - score.mean(0)) / np.maximum(score.std(0), 1e-12), axis=-1)


_MAX_ITER, _TOL, _N_INIT = (config.MIXTURE[k] for k in ('max_iter', 'tol', 'n_init'))


def global_mixture(
  score, *, max_iter=_MAX_ITER, tol=_TOL, n_init=_N_INIT, init='quantile'
) -> Verdict:
  """The paper's rule: one mixture; its higher-mean component is 'mislabeled'.

  One statistic is fit in its own units (as the paper does); several are standardised.
  """
  x = jnp.asarray(score, jnp.float32)
  if x.ndim > 1:
    x = _standardise(x[None], jnp.ones((1, x.shape[0])))[0]
  mixture, p_N = _fit(x, None, max_iter, tol, n_init, init)
  estimate = float(gmm.noise_fraction(mixture))
  return Verdict(_summary_score(score), np.asarray(p_N), estimate, mixture)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _class_fits(z_KxC, weight_KxC, max_iter, tol, n_init, init):
  """The K classes' mixtures, in parallel. Jitted once per shape and settings: a fresh
  closure per call compiled again every time (about 1.6 s of a 0.08 s fit on 2 cores)."""
  return jax.vmap(lambda z, w: _fit(z, w, max_iter, tol, n_init, init))(z_KxC, weight_KxC)


def class_mixtures(
  score,
  labels_N,
  num_classes: int,
  *,
  max_iter=_MAX_ITER,
  tol=_TOL,
  n_init=_N_INIT,
  init='quantile',
) -> Verdict:
  """One mixture per given label (fit in parallel, each over its class's examples only)."""
  labels = np.asarray(labels_N)
  index_KxC, weight_KxC = _class_rows(labels, num_classes)
  # Each class's scores, standardised, so one variance floor suits every class.
  z_KxC = _standardise(jnp.asarray(score, jnp.float32)[index_KxC], jnp.asarray(weight_KxC))
  mixtures, p_KxC = _class_fits(z_KxC, weight_KxC, max_iter, tol, n_init, init)
  real = weight_KxC > 0
  p_N = np.zeros(len(labels), np.float32)
  p_N[index_KxC[real]] = np.asarray(p_KxC)[real]
  weight_K = mixtures.weights[:, -1]
  estimate = float(jnp.sum(weight_K * weight_KxC.sum(1)) / len(labels))
  return Verdict(_summary_score(score), p_N, estimate, mixtures)


def _flags(score_N, flagged_N) -> Verdict:
  """A rule without a mixture: p(mislabeled) is the 0/1 flag, the estimate its mean."""
  return Verdict(score_N, flagged_N.astype(np.float64), float(flagged_N.mean()), None)


def margin_sign(score_N) -> Verdict:
  """Flags every example with a positive score (for the AUM: a negative mean margin)."""
  score_N = np.asarray(score_N, np.float64)
  if score_N.ndim != 1:
    raise ValueError('rule sign takes one statistic, the AUM')
  return _flags(score_N, score_N > 0)


def threshold_verdict(statistics: Mapping, percentile: float) -> Verdict:
  """The threshold-sample rule on the AUM of R runs, `statistics['threshold_aum']`, whose
  threshold samples are `statistics['is_threshold']` ((R, N) each); the score is the
  threshold minus the AUM (`threshold_samples.judge`)."""
  sets = [np.flatnonzero(mask_N) for mask_N in np.asarray(statistics['is_threshold'])]
  margin_N, flagged_N = threshold_samples.judge(statistics['threshold_aum'], sets, percentile)
  return _flags(-margin_N, flagged_N)


def check(statistic: str, rule: str) -> None:
  """Raises ValueError for an unknown statistic or rule, or a pair that does not go together."""
  names = statistic_names(statistic)
  if rule not in RULES:
    raise ValueError(f'unknown rule {rule!r}; known: {", ".join(RULES)}')
  if rule in ('sign', 'threshold') and names not in [(name,) for name in SIGNED]:
    raise ValueError(
      f'rule {rule} needs a margin statistic ({", ".join(SIGNED)}), not {statistic!r}'
    )


def detect(
  statistics: Mapping[str, np.ndarray],
  labels_N=None,
  num_classes: int | None = None,
  *,
  statistic: str = 'aum',
  rule: str = 'sign',
  threshold_percentile: float = 99.0,
  mixture: Mapping = config.MIXTURE,
) -> Verdict:
  """The detector `statistic` + `rule` on a run's per-example statistics (`aul.statistics`).

  `labels_N` and `num_classes` are needed by 'class_gmm'; `mixture` holds the fits'
  max_iter, tol and n_init.
  """
  check(statistic, rule)
  if rule == 'threshold':
    return threshold_verdict(statistics, threshold_percentile)
  score = mislabel_score(statistics, statistic)
  options = {name: mixture[name] for name in ('max_iter', 'tol', 'n_init')}
  if rule == 'sign':
    return margin_sign(score)
  if rule == 'gmm':
    return global_mixture(score, **options)
  if labels_N is None or num_classes is None:
    raise ValueError('rule class_gmm fits one mixture per given label: it needs the labels')
  return class_mixtures(score, labels_N, num_classes, **options)
