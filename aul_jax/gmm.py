"""Gaussian mixtures on per-sample scores, fit by EM in pure jax.numpy.

Step 2 of the AUL method (paper section 4.1) fits two Gaussians to the per-sample AUL
scores; the higher-mean component models the mislabeled samples. Every function here is
pure jax.numpy, so it runs eagerly, under `jax.jit` and under `jax.vmap`, on any device.

Numerics (details in docs/gmm.md):
- EM runs in standardized units z = (x - center) / scale, so float32 keeps its precision
  for scores offset by 1e8 or scaled by 1e-8; parameters are mapped back at the end.
- Responsibilities are computed in log space. For M = 2 on 1-D data the log-odds of the
  lighter component are a quadratic in z, one exp per sample gives both responsibilities
  without cancellation, and one pass over the samples takes all the sums an EM step needs.
- Second moments are summed about the current component means (not about zero), which
  avoids the E[x^2] - m^2 cancellation; variances get `reg_covar` (as in scikit-learn)
  and a floor of 10 machine epsilons of the data variance, so they are never zero.
- On CPU, large inputs are processed in cache-sized blocks inside each iteration.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aul_jax import checks

Array = jax.Array

_INITS = ('quantile', 'kmeans', 'random')
# Most Lloyd iterations of init='kmeans' (it stops earlier once the clusters are stable).
_KMEANS_ITERATIONS = 100
# Samples per block on CPU: a block's temporaries stay in cache, yet each operation on a
# block is large enough to be split over threads (measured best on a 2-core EPYC). Below
# _CPU_BLOCKED_FROM samples the whole array's temporaries fit in L3 and one block is best.
_CPU_BLOCK = 1 << 17
_CPU_BLOCKED_FROM = 1 << 21
# Quantile initialisation sorts at most this many (evenly spaced, positive-weight) samples.
_QUANTILE_SAMPLE = 1 << 16


class GaussianMixture(NamedTuple):
  """A mixture of M Gaussians with diagonal covariance; a pytree of arrays.

  `means` and `variances` are (M,) for 1-D data and (M, D) for (N, D) data;
  `log_likelihood` is the mean log-density per (weighted) sample at these parameters.
  """

  weights: Array
  means: Array
  variances: Array
  log_likelihood: Array
  n_iter: Array
  converged: Array


class _Params(NamedTuple):
  """Mixture parameters in standardized units, always (M,), (M, D), (M, D)."""

  weights_M: Array
  means_MxD: Array
  variances_MxD: Array


class _Frame(NamedTuple):
  """The affine map z = (x - center) / scale from data units to standardized units."""

  center_D: Array
  scale_D: Array


class _Blocks(NamedTuple):
  """Standardized samples, as cache-sized blocks, (num_blocks, block, ...), and a tail."""

  z_main: Array | None
  w_main: Array | None
  z_tail: Array
  w_tail: Array | None


class _Totals(NamedTuple):
  """Weighted sample count, sum and sum of squares of z (per feature)."""

  count: Array
  sum_D: Array
  sum_sq_D: Array


class _Sums(NamedTuple):
  """Per-component weighted sums of r, r (z - a) and r (z - a)^2, a = the current mean.

  `ll_sum` is the weighted sum of the per-sample log-density (in standardized units).
  """

  resp_M: Array
  first_MxD: Array
  second_MxD: Array
  ll_sum: Array


# ----------------------------------------------------------------------------- public API


def fit(
  x: Any,
  n_components: int = 2,
  *,
  weights: Any = None,
  max_iter: int = 100,
  tol: float = 1e-3,
  reg_covar: Any = 1e-6,
  n_init: int = 1,
  init: str | GaussianMixture = 'quantile',
  key: Array | None = None,
) -> GaussianMixture:
  """Fits an M-component diagonal Gaussian mixture to x, (N,) or (N, D), by EM.

  Args:
    x: scores, (N,) or (N, D). Float64 input is fit in float64 when x64 is enabled.
    n_components: M, the number of components.
    weights: optional (N,) per-sample weights in [0, 1]; samples with weight 0 have no
      influence at all, whatever their value (padding, other shards' slots).
    max_iter: most EM iterations; with tol=0 exactly max_iter are run.
    tol: stop when the mean log-likelihood changes by less than tol between iterations
      (scikit-learn's criterion); a Python float.
    reg_covar: added to every variance in each M step, in data units (as scikit-learn).
    n_init: restarts, run in parallel; the fit with the best log-likelihood is kept.
      Restart 0 starts from `init`, the others from means drawn from the data.
    init: 'quantile' (means at the (m + 1/2)/M weighted quantiles, equal weights, the data
      variance), 'kmeans' (Lloyd's k-means from those means, then each cluster's weight,
      mean and variance, as scikit-learn's default; better for unbalanced mixtures),
      'random' (means drawn from the data; needs key) or a GaussianMixture whose weights,
      means and variances are the starting point.
    key: a jax.random key, needed for init='random' and for n_init > 1.

  Returns:
    The fitted GaussianMixture, components in the order EM left them (see sort_by_mean).

  Raises:
    ValueError: on a bad argument; and, when x and weights are concrete arrays (eager
      call), on a non-finite x or weight where weight > 0, naming the first bad index.
      Under jit or vmap that check is skipped: a non-finite score with positive weight
      then gives NaN parameters and log-likelihood, never an exception.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  if weights is not None:
    weights = jnp.asarray(weights, x.dtype)
  _check_config(x, n_components, weights, max_iter, tol, n_init, init, key)
  if not _is_traced(x, weights):
    _check_values(x, weights)
  init_kind = init if isinstance(init, str) else 'given'
  init_params = None if isinstance(init, str) else init
  return _fit_jit(
    x,
    weights,
    init_params,
    key,
    jnp.asarray(reg_covar, x.dtype),
    n_components=int(n_components),
    max_iter=int(max_iter),
    tol=float(tol),
    n_init=int(n_init),
    init_kind=init_kind,
    block=_block_size(x.shape[0]),
  )


def log_prob(gm: GaussianMixture, x: Any) -> Array:
  """Log-density of the mixture at each sample of x, (N,): scikit-learn's score_samples."""
  return jax.nn.logsumexp(_component_log_probs(gm, x), axis=1)


def predict_proba(gm: GaussianMixture, x: Any) -> Array:
  """Posterior probability of each component for each sample of x, (N, M), in log space."""
  return jax.nn.softmax(_component_log_probs(gm, x), axis=1)


def sort_by_mean(gm: GaussianMixture) -> GaussianMixture:
  """Reorders components by ascending mean, so the last is the 'mislabeled' component.

  For (M, D) means the key is the mean over features.
  """
  order_M = jnp.argsort(_mean_key(gm))
  return gm._replace(
    weights=jnp.asarray(gm.weights)[order_M],
    means=jnp.asarray(gm.means)[order_M],
    variances=jnp.asarray(gm.variances)[order_M],
  )


def mislabel_probability(gm: GaussianMixture, x: Any) -> Array:
  """Responsibility of the highest-mean component for each sample, (N,): p(mislabeled)."""
  return predict_proba(gm, x)[:, jnp.argmax(_mean_key(gm))]


def noise_fraction(gm: GaussianMixture) -> Array:
  """Weight of the highest-mean component: the estimated fraction of mislabeled samples."""
  return jnp.asarray(gm.weights)[jnp.argmax(_mean_key(gm))]


# ------------------------------------------------------------------------- validation


def _check_config(x, n_components, weights, max_iter, tol, n_init, init, key) -> None:
  """Raises ValueError on a bad shape or option, before any work starts."""
  if x.ndim not in (1, 2):
    raise ValueError(f'x must be (N,) or (N, D); got shape {x.shape}')
  if x.shape[0] == 0 or (x.ndim == 2 and x.shape[1] == 0):
    raise ValueError(f'x is empty: shape {x.shape}')
  if not (checks.is_int(n_components) and n_components >= 1):
    raise ValueError(f'n_components must be an int >= 1; got {n_components!r}')
  if weights is not None and weights.shape != x.shape[:1]:
    raise ValueError(f'weights must have shape {x.shape[:1]}; got {weights.shape}')
  if not (checks.is_int(max_iter) and max_iter >= 1):
    raise ValueError(f'max_iter must be an int >= 1; got {max_iter!r}')
  if not (checks.is_number(tol) and tol >= 0):
    raise ValueError(f'tol must be a Python float >= 0; got {tol!r}')
  if not (checks.is_int(n_init) and n_init >= 1):
    raise ValueError(f'n_init must be an int >= 1; got {n_init!r}')
  if isinstance(init, str):
    if init not in _INITS:
      raise ValueError(f'unknown init {init!r}; known: {", ".join(_INITS)} or a GaussianMixture')
  elif isinstance(init, GaussianMixture):
    _check_init_shapes(init, x, n_components)
  else:
    raise ValueError(f'init must be a string or a GaussianMixture; got {type(init).__name__}')
  if key is None and (init == 'random' or n_init > 1):
    raise ValueError("init='random' and n_init > 1 need a key, e.g. key=jax.random.key(0)")


def _check_init_shapes(init: GaussianMixture, x: Array, n_components: int) -> None:
  """Raises ValueError unless init's parameters fit M = n_components and x's features."""
  mean_shape = (n_components,) + x.shape[1:]
  got = tuple(np.shape(a) for a in (init.weights, init.means, init.variances))
  if got != ((n_components,), mean_shape, mean_shape):
    raise ValueError(
      f'init parameters must have shapes {(n_components,)}, {mean_shape}, {mean_shape} '
      f'(weights, means, variances); got {got[0]}, {got[1]}, {got[2]}'
    )


def _is_traced(*arrays: Array | None) -> bool:
  """True under jit or vmap, where values cannot be inspected."""
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


def _check_values(x: Array, weights: Array | None) -> None:
  """Raises ValueError naming the first non-finite score (with weight > 0) or bad weight."""
  if weights is not None:
    bad_N = ~((weights >= 0) & (weights <= 1))
    if bool(jnp.any(bad_N)):
      i = int(jnp.argmax(bad_N))
      raise ValueError(f'weights[{i}] is {float(weights[i])}; weights must be in [0, 1]')
  bad = ~jnp.isfinite(x)
  if weights is not None:
    bad = bad & (weights > 0).reshape((-1,) + (1,) * (x.ndim - 1))
  if bool(jnp.any(bad)):
    index = np.unravel_index(int(jnp.argmax(bad.ravel())), x.shape)
    where = ', '.join(str(int(i)) for i in index)
    raise ValueError(f'x[{where}] is {float(x[index])}; fit needs finite scores')
  if weights is not None and not bool(jnp.any(weights > 0)):
    raise ValueError('weights are all zero; fit needs at least one sample with weight > 0')


# --------------------------------------------------------------------------- fitting


def _block_size(n: int) -> int | None:
  """Samples per block inside an EM iteration: cache-sized for large N on CPU, else None."""
  return _CPU_BLOCK if jax.default_backend() == 'cpu' and n >= _CPU_BLOCKED_FROM else None


@functools.partial(
  jax.jit, static_argnames=('n_components', 'max_iter', 'tol', 'n_init', 'init_kind', 'block')
)
def _fit_jit(
  x,
  weights,
  init_params,
  key,
  reg_covar,
  *,
  n_components,
  max_iter,
  tol,
  n_init,
  init_kind,
  block,
) -> GaussianMixture:
  """The traced body of `fit`: standardize, initialise, run EM (per restart), map back."""
  x_NxD = x.reshape(x.shape[0], -1)
  mask_N = None if weights is None else weights > 0
  w_N = None if weights is None else jnp.where(mask_N, weights, 0)
  x_NxD = x_NxD if mask_N is None else jnp.where(mask_N[:, None], x_NxD, 0)
  frame = _frame(x_NxD, w_N)
  z_NxD = (x_NxD - frame.center_D) / frame.scale_D
  totals = _totals(z_NxD, w_N)
  reg_D = jnp.minimum(reg_covar / frame.scale_D / frame.scale_D, jnp.finfo(x.dtype).max / 16)
  floor = 10 * jnp.finfo(x.dtype).eps
  starts = _initial_params(z_NxD, w_N, frame, init_params, key, n_components, n_init, init_kind)
  two_1d = x.ndim == 1 and n_components == 2
  estep = _estep_two if two_1d else _estep_general
  blocks = _blocks(z_NxD[:, 0] if two_1d else z_NxD, w_N, block)
  run = lambda p: _em(p, estep, blocks, totals, reg_D, floor, max_iter, tol)
  if n_init == 1:
    result = run(jax.tree.map(lambda a: a[0], starts))
  else:
    result = _best(jax.vmap(run)(starts))
  return _to_data_units(*result, frame, x.ndim)


def _best(results: tuple) -> tuple:
  """The restart with the highest final log-likelihood (NaN counts as the lowest)."""
  ll_I = results[1]
  best = jnp.argmax(jnp.where(jnp.isnan(ll_I), -jnp.inf, ll_I))
  return jax.tree.map(lambda a: a[best], results)


def _frame(x_NxD: Array, w_N: Array | None) -> _Frame:
  """Weighted mean and standard deviation per feature (scale 1 for constant data)."""
  center_D = _weighted_mean(x_NxD, w_N)
  # A second pass on the residuals recovers the digits lost to a large offset.
  center_D = center_D + _weighted_mean(x_NxD - center_D, w_N)
  std_D = jnp.sqrt(_weighted_mean(jnp.square(x_NxD - center_D), w_N))
  tiny = jnp.finfo(x_NxD.dtype).tiny
  return _Frame(center_D, jnp.where(std_D >= tiny, std_D, jnp.ones_like(std_D)))


def _weighted_mean(v_NxD: Array, w_N: Array | None) -> Array:
  """Weighted mean over samples; safe when all weights are zero."""
  if w_N is None:
    return jnp.mean(v_NxD, axis=0)
  total = jnp.sum(w_N)
  return jnp.sum(w_N[:, None] * v_NxD, axis=0) / jnp.where(total > 0, total, 1)


def _totals(z_NxD: Array, w_N: Array | None) -> _Totals:
  """The weighted count, sum and sum of squares of the standardized samples."""
  if w_N is None:
    count = jnp.asarray(z_NxD.shape[0], z_NxD.dtype)
    return _Totals(count, jnp.sum(z_NxD, axis=0), jnp.sum(jnp.square(z_NxD), axis=0))
  w_Nx1 = w_N[:, None]
  return _Totals(
    jnp.sum(w_N), jnp.sum(w_Nx1 * z_NxD, axis=0), jnp.sum(w_Nx1 * jnp.square(z_NxD), axis=0)
  )


def _blocks(z: Array, w_N: Array | None, block: int | None) -> _Blocks:
  """Splits z, (N, ...), into blocks of `block` samples, (num_blocks, block, ...), and a tail."""
  n = z.shape[0]
  if block is None or n < 2 * block or _is_sharded(z):
    return _Blocks(None, None, z, w_N)
  head = (n // block) * block
  z_main = z[:head].reshape((n // block, block) + z.shape[1:])
  w_main = None if w_N is None else w_N[:head].reshape(n // block, block)
  w_tail = None if w_N is None else w_N[head:]
  return _Blocks(z_main, w_main, z[head:], w_tail)


def _is_sharded(a: Array) -> bool:
  """True when a is split over devices (then each device already works on its own part)."""
  return any(axis is not None for axis in jax.typeof(a).sharding.spec)


def _whole(a: Array) -> jax.sharding.NamedSharding:
  """The sharding that keeps a whole on every device of its mesh."""
  return jax.sharding.NamedSharding(jax.typeof(a).sharding.mesh, jax.sharding.PartitionSpec())


def _replicated(tree: Any) -> Any:
  """The arrays of tree whole on every device, as sort needs on an explicit mesh."""
  replicate = lambda a: jax.sharding.reshard(a, _whole(a)) if _is_sharded(a) else a
  return jax.tree.map(replicate, tree)


def _take(a: Array, index: Array) -> Array:
  """a[index], whole on every device even when a is split over devices."""
  return a.at[index].get(out_sharding=_whole(a)) if _is_sharded(a) else a[index]


def _sum_over_blocks(fn: Callable[[Array, Array | None], Any], blocks: _Blocks) -> Any:
  """Sums the pytree fn(z, w) over the tail and each block, one block at a time."""
  acc = fn(blocks.z_tail, blocks.w_tail)
  if blocks.z_main is None:
    return acc

  def body(i, acc):
    w = None if blocks.w_main is None else blocks.w_main[i]
    return jax.tree.map(jnp.add, acc, fn(blocks.z_main[i], w))

  return lax.fori_loop(0, blocks.z_main.shape[0], body, acc)


# --------------------------------------------------------------------- initialisation


def _initial_params(
  z_NxD, w_N, frame, init_params, key, n_components, n_init, init_kind
) -> _Params:
  """Stacked (n_init, ...) starting points in standardized units; restart 0 is `init`."""
  if init_kind == 'given':
    first = _standardize_params(init_params, frame, z_NxD.dtype)
  elif init_kind == 'quantile':
    first = _equal_weights(_quantile_means(z_NxD, w_N, n_components))
  elif init_kind == 'kmeans':
    first = _kmeans_params(z_NxD, w_N, n_components)
  else:
    key, sub = jax.random.split(key)
    first = _equal_weights(_random_means(z_NxD, w_N, n_components, sub))
  if n_init == 1:
    return jax.tree.map(lambda a: a[None], first)
  keys = jax.random.split(key, n_init - 1)
  rest = jax.vmap(lambda k: _equal_weights(_random_means(z_NxD, w_N, n_components, k)))(keys)
  return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def _equal_weights(means_MxD: Array) -> _Params:
  """Equal weights and the data variance, which is 1 in standardized units."""
  k = means_MxD.shape[0]
  weights_M = jnp.full((k,), 1 / k, means_MxD.dtype)
  return _Params(weights_M, means_MxD, jnp.ones_like(means_MxD))


def _kmeans_params(z_NxD: Array, w_N: Array | None, k: int) -> _Params:
  """Each k-means cluster's weight, mean and variance (Lloyd from the quantiles, until stable)."""
  w_N = jnp.ones(z_NxD.shape[0], z_NxD.dtype) if w_N is None else w_N

  def clusters(means_MxD):
    dist_NxM = jnp.stack([jnp.sum(jnp.square(z_NxD - m_D), axis=1) for m_D in means_MxD], 1)
    member_NxM = w_N[:, None] * jax.nn.one_hot(jnp.argmin(dist_NxM, axis=1), k, dtype=w_N.dtype)
    count_M = jnp.sum(member_NxM, axis=0)
    safe_M = jnp.where(count_M > 0, count_M, 1)[:, None]
    centre_MxD = jnp.where(count_M[:, None] > 0, member_NxM.T @ z_NxD / safe_M, means_MxD)
    return member_NxM, count_M, centre_MxD

  def moving(state):
    means_MxD, previous_MxD, i = state
    return (i < _KMEANS_ITERATIONS) & jnp.any(means_MxD != previous_MxD)

  def step(state):
    means_MxD, _, i = state
    return clusters(means_MxD)[2], means_MxD, i + 1

  start_MxD = _quantile_means(z_NxD, w_N, k)
  means_MxD, _, _ = lax.while_loop(moving, step, step((start_MxD, start_MxD, 0)))
  member_NxM, count_M, means_MxD = clusters(means_MxD)
  safe_M = jnp.where(count_M > 0, count_M, 1)[:, None]
  spread_MxD = (
    jnp.stack([member_NxM[:, j] @ jnp.square(z_NxD - means_MxD[j]) for j in range(k)]) / safe_M
  )
  floor = 10 * jnp.finfo(z_NxD.dtype).eps
  weights_M = (count_M + floor) / jnp.sum(count_M + floor)
  return _Params(weights_M, means_MxD, jnp.maximum(spread_MxD, floor))


def _quantile_means(z_NxD: Array, w_N: Array | None, k: int) -> Array:
  """The weighted (m + 1/2)/M quantiles per feature (inverted CDF), (M, D).

  Above _QUANTILE_SAMPLE samples, of that many positive-weight samples evenly spaced by
  position, which keeps the initialisation O(N) and deterministic.
  """
  z_ExD, w_E = _replicated(_even_sample(z_NxD, w_N, _QUANTILE_SAMPLE))
  probs_M = (jnp.arange(k, dtype=z_NxD.dtype) + 0.5) / k
  w_E = jnp.ones(z_ExD.shape[0], z_NxD.dtype) if w_E is None else w_E

  def per_feature(z_E):
    order_E = jnp.argsort(z_E)
    cum_E = jnp.cumsum(w_E[order_E])
    index_M = jnp.searchsorted(cum_E, probs_M * cum_E[-1], side='left')
    return z_E[order_E][jnp.minimum(index_M, z_E.shape[0] - 1)]

  return jax.vmap(per_feature, in_axes=1, out_axes=1)(z_ExD)


def _even_sample(z_NxD: Array, w_N: Array | None, size: int) -> tuple[Array, Array | None]:
  """At most `size` samples with weight > 0, evenly spaced by position."""
  n = z_NxD.shape[0]
  if n <= size:
    return z_NxD, w_N
  if w_N is None:
    return _take(z_NxD, (np.arange(size) * n) // size), None
  rank_N = jnp.cumsum(_replicated(w_N > 0), axis=0)
  spacing = rank_N[-1].astype(z_NxD.dtype) / size
  target_E = jnp.floor((jnp.arange(size) + 0.5) * spacing).astype(rank_N.dtype) + 1
  index_E = jnp.minimum(jnp.searchsorted(rank_N, target_E, side='left'), n - 1)
  return _take(z_NxD, index_E), _take(w_N, index_E)


def _random_means(z_NxD: Array, w_N: Array | None, k: int, key: Array) -> Array:
  """M samples drawn with probability proportional to weight, (M, D)."""
  n = z_NxD.shape[0]
  if w_N is None:
    return _take(z_NxD, jax.random.randint(key, (k,), 0, n))
  logits_N = jnp.where(w_N > 0, jnp.log(jnp.where(w_N > 0, w_N, 1)), -jnp.inf)
  return _take(z_NxD, jax.random.categorical(key, _replicated(logits_N), shape=(k,)))


def _standardize_params(gm: GaussianMixture, frame: _Frame, dtype) -> _Params:
  """A user-given starting point, in standardized units."""
  k = np.shape(gm.weights)[0]
  means_MxD = jnp.asarray(gm.means, dtype).reshape(k, -1)
  variances_MxD = jnp.asarray(gm.variances, dtype).reshape(k, -1)
  weights_M = jnp.asarray(gm.weights, dtype)
  return _Params(
    weights_M / jnp.sum(weights_M),
    (means_MxD - frame.center_D) / frame.scale_D,
    variances_MxD / jnp.square(frame.scale_D),
  )


def _to_data_units(params, ll, n_iter, converged, frame, ndim) -> GaussianMixture:
  """Maps standardized parameters and log-likelihood back to the units of x."""
  means_MxD = frame.center_D + frame.scale_D * params.means_MxD
  variances_MxD = jnp.square(frame.scale_D) * params.variances_MxD
  ll = ll - jnp.sum(jnp.log(frame.scale_D))
  if ndim == 1:
    means_MxD, variances_MxD = means_MxD[:, 0], variances_MxD[:, 0]
  return GaussianMixture(params.weights_M, means_MxD, variances_MxD, ll, n_iter, converged)


# ---------------------------------------------------------------------------------- EM


def _em(params, estep, blocks, totals, reg_D, floor, max_iter, tol):
  """EM from params; returns the final parameters, their mean LL, n_iter and converged.

  With tol = 0 exactly max_iter iterations run and the per-iteration log-likelihood is
  not computed; otherwise EM stops once it changes by less than tol (scikit-learn's rule).
  """
  count = jnp.where(totals.count > 0, totals.count, 1)
  step = lambda p, sums: _mstep(p, sums, reg_D, floor)
  if tol > 0:
    return _em_until_converged(params, estep, step, blocks, totals, count, max_iter, tol)
  params = lax.fori_loop(0, max_iter, lambda i, p: step(p, estep(p, blocks, totals, False)), params)
  ll = estep(params, blocks, totals, True).ll_sum / count
  return params, ll, jnp.array(max_iter, jnp.int32), jnp.array(False)


def _em_until_converged(params, estep, step, blocks, totals, count, max_iter, tol):
  """EM with the log-likelihood of every iteration; one E step per pass, plus one.

  Each pass measures the log-likelihood of the current parameters; the pass after the
  stopping rule fires keeps the parameters and only records their log-likelihood.
  """

  def body(state):
    params, ll_prev, _, n_iter, converged, _ = state
    sums = estep(params, blocks, totals, True)
    ll = sums.ll_sum / count
    stop = converged | (n_iter >= max_iter)
    keep = lambda old, new: jax.tree.map(lambda a, b: jnp.where(stop, a, b), old, new)
    return (
      keep(params, step(params, sums)),
      ll,
      ll,
      jnp.where(stop, n_iter, n_iter + 1),
      jnp.where(stop, converged, jnp.abs(ll - ll_prev) < tol),
      stop,
    )

  dtype = params.means_MxD.dtype
  minus_inf = jnp.array(-jnp.inf, dtype)
  state = (params, minus_inf, minus_inf, jnp.array(0, jnp.int32), jnp.array(False), False)
  params, _, ll, n_iter, converged, _ = lax.while_loop(lambda s: ~s[5], body, state)
  return params, ll, n_iter, converged


def _mstep(params, sums, reg_D, floor) -> _Params:
  """New weights, means and variances from sums taken about the current means."""
  eps = 10 * jnp.finfo(sums.resp_M.dtype).eps  # scikit-learn's guard for empty components
  resp_M = sums.resp_M + eps
  shift_MxD = sums.first_MxD / resp_M[:, None]
  variances_MxD = sums.second_MxD / resp_M[:, None] - jnp.square(shift_MxD) + reg_D
  return _Params(
    resp_M / jnp.sum(resp_M),
    params.means_MxD + shift_MxD,
    jnp.maximum(variances_MxD, floor),
  )


def _log_normalizers(params: _Params) -> Array:
  """log w_k - 1/2 sum_d log(2 pi v_kd), (M,)."""
  return jnp.log(params.weights_M) - 0.5 * jnp.sum(
    jnp.log(2 * jnp.pi * params.variances_MxD), axis=1
  )


def _estep_general(params: _Params, blocks: _Blocks, totals: _Totals, with_ll: bool) -> _Sums:
  """Responsibility-weighted sums for any M and D, log-sum-exp over per-component arrays."""
  del totals, with_ll
  norm_M = _log_normalizers(params)

  def sums(z_NxD, w_N):
    logp = [
      norm_M[k]
      - 0.5 * jnp.sum(jnp.square(z_NxD - params.means_MxD[k]) / params.variances_MxD[k], axis=1)
      for k in range(norm_M.shape[0])
    ]
    top_N = logp[0]
    for lp_N in logp[1:]:
      top_N = jnp.maximum(top_N, lp_N)
    top_N = jnp.where(jnp.isfinite(top_N), top_N, 0)
    lse_N = top_N + jnp.log(sum(jnp.exp(lp_N - top_N) for lp_N in logp))
    resp, first, second = [], [], []
    for k, lp_N in enumerate(logp):
      r_N = jnp.exp(lp_N - lse_N) if w_N is None else w_N * jnp.exp(lp_N - lse_N)
      d_NxD = z_NxD - params.means_MxD[k]
      rd_NxD = r_N[:, None] * d_NxD
      resp.append(jnp.sum(r_N))
      first.append(jnp.sum(rd_NxD, axis=0))
      second.append(jnp.sum(rd_NxD * d_NxD, axis=0))
    ll_sum = jnp.sum(lse_N if w_N is None else w_N * lse_N)
    return _Sums(jnp.stack(resp), jnp.stack(first), jnp.stack(second), ll_sum)

  return _sum_over_blocks(sums, blocks)


def _estep_two(params: _Params, blocks: _Blocks, totals: _Totals, with_ll: bool) -> _Sums:
  """One pass for M = 2 on 1-D data, with one exp per sample.

  Components are swapped so that 0 is the lighter one. With d = z - m_0, its log-odds
  are a quadratic a d^2 + b d + c, and both responsibilities, sigmoid(+-logit), come
  without cancellation from e = exp(-|logit|). Four sums are taken over the samples: the
  lighter component's three and the heavier one's second moment; the heavier one's
  count and first moment are totals minus the lighter one's, well conditioned as it
  holds at least half the weight.
  """
  swap = params.weights_M[0] > params.weights_M[1]
  in_order = lambda a: jnp.where(swap, a[::-1], a)  # its own inverse
  norm_M = in_order(_log_normalizers(params))
  mean_M, var_M = in_order(params.means_MxD[:, 0]), in_order(params.variances_MxD[:, 0])
  gap = mean_M[1] - mean_M[0]
  a = 0.5 * (1 / var_M[1] - 1 / var_M[0])
  b = -gap / var_M[1]
  c = norm_M[0] - norm_M[1] + 0.5 * gap * gap / var_M[1]

  def sums(z_N, w_N):
    d_N = z_N - mean_M[0]
    logit_N = (a * d_N + b) * d_N + c
    e_N = jnp.exp(-jnp.abs(logit_N))
    inv_N = 1 / (1 + e_N)
    light_N = jnp.where(logit_N >= 0, 1, e_N) * inv_N
    heavy_N = jnp.where(logit_N >= 0, e_N, 1) * inv_N
    if w_N is not None:
      light_N, heavy_N = w_N * light_N, w_N * heavy_N
    rd_N = light_N * d_N
    out = (
      jnp.sum(light_N),
      jnp.sum(rd_N),
      jnp.sum(rd_N * d_N),
      jnp.sum(heavy_N * jnp.square(d_N - gap)),
    )
    if not with_ll:
      return out + (jnp.zeros((), z_N.dtype),)
    # log(p_0 + p_1) = max(l_0, l_1) + log1p(e), without cancellation.
    l_light_N = norm_M[0] - 0.5 * jnp.square(d_N) / var_M[0]
    l_heavy_N = norm_M[1] - 0.5 * jnp.square(d_N - gap) / var_M[1]
    ll_N = jnp.where(logit_N >= 0, l_light_N, l_heavy_N) + jnp.log1p(e_N)
    return out + (jnp.sum(ll_N if w_N is None else w_N * ll_N),)

  light_r, light_rd, light_rdd, heavy_rdd, ll_sum = _sum_over_blocks(sums, blocks)
  heavy_r = jnp.maximum(totals.count - light_r, 0)
  # Sum of w (z - m_heavy) over all samples, less the light component's share.
  heavy_rd = totals.sum_D[0] - mean_M[1] * totals.count - (light_rd - gap * light_r)
  pair = lambda light, heavy: in_order(jnp.stack([light, heavy]))
  return _Sums(
    pair(light_r, heavy_r),
    pair(light_rd, heavy_rd)[:, None],
    pair(light_rdd, heavy_rdd)[:, None],
    ll_sum,
  )


# ------------------------------------------------------------------------ prediction


def _component_log_probs(gm: GaussianMixture, x: Any) -> Array:
  """log w_k + log N(x | mean_k, var_k) for each sample and component, (N, M)."""
  means = jnp.asarray(gm.means)
  k = means.shape[0]
  x = jnp.asarray(x, means.dtype)
  if x.ndim != means.ndim or x.shape[1:] != means.shape[1:]:
    raise ValueError(f'x must be (N,) + {means.shape[1:]} for this mixture; got {x.shape}')
  x_Nx1xD = x.reshape(-1, 1, means.size // k)
  means_1xKxD = means.reshape(1, k, -1)
  variances_1xKxD = jnp.asarray(gm.variances).reshape(1, k, -1)
  quad_NxM = jnp.sum(jnp.square(x_Nx1xD - means_1xKxD) / variances_1xKxD, axis=2)
  norm_M = jnp.log(jnp.asarray(gm.weights)) - 0.5 * jnp.sum(
    jnp.log(2 * math.pi * variances_1xKxD[0]), axis=1
  )
  return norm_M - 0.5 * quad_NxM


def _mean_key(gm: GaussianMixture) -> Array:
  """Per-component sort key: the mean, or the mean over features for (M, D) means."""
  means = jnp.asarray(gm.means)
  return means.reshape(means.shape[0], -1).mean(axis=1)
