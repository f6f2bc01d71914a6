"""Detectors: which training-dynamics statistic flags an example, and by which rule.

A statistic is turned into a mislabeling score (higher = more suspicious). A rule turns
scores into p(mislabeled | score) and a noise-rate estimate:
  gmm        one 2-component Gaussian mixture over all examples (the paper's rule);
  class_gmm  one mixture per given label, so a class whose examples are all harder (or
             a class that absorbs another's flipped labels) gets its own clean and noisy
             modes; the noise estimate is the count-weighted mean of the classes' weights.
The threshold-sample rule lives in `aul_jax.threshold_samples` (it needs extra runs).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aul_jax import gmm

# Mislabeling score of each statistic (higher = more likely mislabeled).
SCORES: dict[str, Callable[[dict], np.ndarray]] = {
  'aul': lambda s: s['aul'],
  'aum': lambda s: -s['aum'],
  'confidence': lambda s: -s['confidence'],
  'last_loss': lambda s: s['last_loss'],
}
RULES = ('gmm', 'class_gmm')


class Verdict(NamedTuple):
  score_N: np.ndarray  # Higher = more likely mislabeled.
  p_mislabeled_N: np.ndarray
  noise_estimate: float
  mixture: gmm.GaussianMixture  # Sorted by mean; per-class rules stack one per class.


def mislabel_score(statistics: dict, statistic: str) -> np.ndarray:
  if statistic not in SCORES:
    raise ValueError(f'unknown statistic {statistic!r}; known: {", ".join(SCORES)}')
  return np.asarray(SCORES[statistic](statistics), np.float64)


def _fit(score_N, weight_N, max_iter: int, tol: float, n_init: int, init: str):
  key = jax.random.key(0) if n_init > 1 or init == 'random' else None
  fitted = gmm.fit(
    score_N, 2, weights=weight_N, max_iter=max_iter, tol=tol, n_init=n_init, init=init, key=key
  )
  mixture = gmm.sort_by_mean(fitted)
  return mixture, gmm.mislabel_probability(mixture, score_N)


def global_mixture(score_N, *, max_iter=1000, tol=1e-7, n_init=1, init='quantile') -> Verdict:
  """The paper's rule: one mixture; its higher-mean component is 'mislabeled'."""
  score = jnp.asarray(score_N, jnp.float32)
  mixture, p_N = _fit(score, None, max_iter, tol, n_init, init)
  return Verdict(np.asarray(score_N), np.asarray(p_N), float(gmm.noise_fraction(mixture)), mixture)


def class_mixtures(
  score_N, labels_N, num_classes: int, *, max_iter=1000, tol=1e-7, n_init=1, init='quantile'
) -> Verdict:
  """One mixture per given label (fit in parallel, each over its class's examples)."""
  score = jnp.asarray(score_N, jnp.float32)
  labels = jnp.asarray(labels_N)
  member_KxN = (labels[None] == jnp.arange(num_classes)[:, None]).astype(jnp.float32)
  # Each class's scores, standardised, so one variance floor suits every class.
  count_K = jnp.maximum(member_KxN.sum(1), 1.0)
  mean_K = member_KxN @ score / count_K
  std_K = jnp.sqrt(jnp.maximum(member_KxN @ score**2 / count_K - mean_K**2, 1e-12))
  z_KxN = (score[None] - mean_K[:, None]) / std_K[:, None]
  fit = jax.jit(jax.vmap(lambda z, w: _fit(z, w, max_iter, tol, n_init, init)))
  mixtures, p_KxN = fit(jnp.where(member_KxN > 0, z_KxN, 0.0), member_KxN)
  p_N = jnp.take_along_axis(p_KxN, labels[None], axis=0)[0]
  weight_K = mixtures.weights[:, -1]
  estimate = float(jnp.sum(weight_K * member_KxN.sum(1)) / len(labels_N))
  return Verdict(np.asarray(score_N), np.asarray(p_N), estimate, mixtures)


def run_rule(rule: str, score_N, labels_N, num_classes: int, **fit_options) -> Verdict:
  if rule == 'gmm':
    return global_mixture(score_N, **fit_options)
  if rule == 'class_gmm':
    return class_mixtures(score_N, labels_N, num_classes, **fit_options)
  raise ValueError(f'unknown rule {rule!r}; known: {", ".join(RULES)}')


def detect(statistics: dict, labels_N, num_classes: int, detector_config, gmm_config) -> Verdict:
  """The configured detector (`config.detector`) on a run's statistics (`aul.statistics`)."""
  score_N = mislabel_score(statistics, detector_config.statistic)
  return run_rule(
    detector_config.rule,
    score_N,
    labels_N,
    num_classes,
    max_iter=gmm_config.max_iter,
    tol=gmm_config.tol,
    n_init=gmm_config.n_init,
  )
