"""Tests for the EM Gaussian mixture: agreement with scikit-learn, numerics, jit/vmap, weights."""

import os
import warnings

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkMixture

from aul_jax import gmm

SEEDS = range(12)


def _bimodal(seed: int, n: int = 1000, dims: int = 0) -> np.ndarray:
  """Two well separated clusters with random weight, widths and offset; (n,) or (n, dims)."""
  rng = np.random.default_rng(seed)
  shape = (n,) if dims == 0 else (n, dims)
  widths = rng.uniform(0.2, 1.0, 2)
  gap = rng.uniform(2.5, 4.0) * widths.max()
  is_noisy = (rng.random(n) < rng.uniform(0.1, 0.5)).reshape((n,) + (1,) * (len(shape) - 1))
  offset = rng.normal()
  clean = rng.normal(offset, widths[0], shape)
  return np.where(is_noisy, rng.normal(offset + gap, widths[1], shape), clean)


def _start(x: np.ndarray, k: int = 2) -> gmm.GaussianMixture:
  """A deterministic starting point: quantile means, equal weights, the data variance."""
  x2 = x.reshape(len(x), -1)
  means = np.quantile(x2, (np.arange(k) + 0.5) / k, axis=0)
  variances = np.broadcast_to(x2.var(axis=0), means.shape)
  shape = (k,) + x.shape[1:]
  return gmm.GaussianMixture(
    np.full(k, 1 / k), means.reshape(shape), variances.reshape(shape), 0.0, 0, False
  )


def _sklearn(x, start, max_iter, tol=0.0, reg_covar=1e-6):
  """scikit-learn's float64 EM (diagonal covariances) from the same starting point."""
  x2 = x.reshape(len(x), -1)
  k = len(start.weights)
  sk = SkMixture(
    k,
    covariance_type='diag',
    max_iter=max_iter,
    tol=tol,
    reg_covar=reg_covar,
    init_params='random_from_data',
    weights_init=np.asarray(start.weights),
    means_init=np.asarray(start.means).reshape(k, -1),
    precisions_init=1 / np.asarray(start.variances).reshape(k, -1),
  )
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    return sk.fit(x2)


def _fit64(x, weights=None, **kwargs) -> gmm.GaussianMixture:
  """`gmm.fit` in float64, results as NumPy arrays."""
  with jax.enable_x64(True):
    fit = gmm.fit(jnp.asarray(x, jnp.float64), weights=weights, **kwargs)
    return jax.tree.map(np.asarray, fit)


def _assert_same(a: gmm.GaussianMixture, b: gmm.GaussianMixture, rtol: float, atol: float = 0):
  for name in ('weights', 'means', 'variances', 'log_likelihood'):
    np.testing.assert_allclose(
      getattr(a, name), getattr(b, name), rtol=rtol, atol=atol, err_msg=name
    )


# ------------------------------------------------------------------- scikit-learn agreement


@pytest.mark.parametrize('seed', SEEDS)
def test_parameters_and_posteriors_match_sklearn_float64(seed):
  x = _bimodal(seed)
  start = _start(x)
  ours = _fit64(x, init=start, max_iter=40, tol=0.0)
  sk = _sklearn(x, start, max_iter=40)
  np.testing.assert_allclose(ours.weights, sk.weights_, rtol=1e-9)
  np.testing.assert_allclose(ours.means, sk.means_[:, 0], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(ours.variances, sk.covariances_[:, 0], rtol=1e-9)
  np.testing.assert_allclose(ours.log_likelihood, sk.score(x[:, None]), rtol=1e-10)
  with jax.enable_x64(True):
    proba = gmm.predict_proba(ours, x)
    log_prob = gmm.log_prob(ours, x)
  np.testing.assert_allclose(proba, sk.predict_proba(x[:, None]), atol=1e-9)
  np.testing.assert_allclose(log_prob, sk.score_samples(x[:, None]), rtol=1e-9)
  assert int(ours.n_iter) == sk.n_iter_ == 40 and not ours.converged


@pytest.mark.parametrize('seed', SEEDS[:4])
@pytest.mark.parametrize(('k', 'dims'), [(3, 0), (2, 3)])
def test_general_k_and_diagonal_data_match_sklearn_float64(seed, k, dims):
  x = _bimodal(seed, n=600, dims=dims)
  start = _start(x, k)
  ours = _fit64(x, n_components=k, init=start, max_iter=25, tol=0.0)
  sk = _sklearn(x, start, max_iter=25)
  means = sk.means_.reshape(ours.means.shape)
  np.testing.assert_allclose(ours.weights, sk.weights_, rtol=1e-8)
  np.testing.assert_allclose(ours.means, means, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(ours.variances, sk.covariances_.reshape(means.shape), rtol=1e-8)
  np.testing.assert_allclose(ours.log_likelihood, sk.score(x.reshape(len(x), -1)), rtol=1e-10)


@pytest.mark.parametrize('seed', SEEDS[:6])
def test_stops_at_the_same_iteration_as_sklearn(seed):
  x = _bimodal(seed)
  start = _start(x)
  ours = _fit64(x, init=start, max_iter=500, tol=1e-4)
  sk = _sklearn(x, start, max_iter=500, tol=1e-4)
  assert bool(ours.converged) and sk.converged_
  assert int(ours.n_iter) == sk.n_iter_
  np.testing.assert_allclose(ours.means, sk.means_[:, 0], rtol=1e-9)


@pytest.mark.parametrize('seed', SEEDS)
def test_converged_fit_reaches_sklearn_log_likelihood(seed):
  x = _bimodal(seed)
  sk = SkMixture(2, tol=1e-10, max_iter=2000, n_init=3, random_state=seed).fit(x[:, None])
  best = sk.score(x[:, None])
  ours64 = _fit64(x, max_iter=2000, tol=1e-10)
  ours32 = gmm.fit(x.astype(np.float32), max_iter=2000, tol=1e-6)
  assert bool(ours64.converged) and bool(ours32.converged)
  assert float(ours64.log_likelihood) >= best - 1e-9
  assert float(ours32.log_likelihood) >= best - 1e-5


@pytest.mark.parametrize('seed', SEEDS[:3])
def test_float32_is_within_1e_5_of_float64(seed):
  x = _bimodal(seed, n=100_000)
  start = _start(x)
  ours64 = _fit64(x, init=start, max_iter=100, tol=0.0)
  ours32 = jax.tree.map(np.asarray, gmm.fit(x.astype(np.float32), init=start, max_iter=100, tol=0))
  scale = np.sqrt(ours64.variances)
  np.testing.assert_allclose(ours32.weights, ours64.weights, rtol=1e-5)
  np.testing.assert_allclose(ours32.variances, ours64.variances, rtol=1e-5)
  # Means relative to the component width: a mean near zero has no relative precision.
  assert np.max(np.abs(ours32.means - ours64.means) / scale) < 1e-5
  np.testing.assert_allclose(ours32.log_likelihood, ours64.log_likelihood, rtol=1e-5)


@pytest.mark.skipif(
  not os.environ.get('AUL_LARGE_TESTS'), reason='set AUL_LARGE_TESTS=1 (N = 10^7, ~30 s)'
)
def test_float32_is_within_1e_5_of_float64_at_ten_million():
  x = _bimodal(0, n=10_000_000)
  start = _start(x)
  ours64 = _fit64(x, init=start, max_iter=100, tol=0.0)
  ours32 = jax.tree.map(np.asarray, gmm.fit(x.astype(np.float32), init=start, max_iter=100, tol=0))
  np.testing.assert_allclose(ours32.weights, ours64.weights, rtol=1e-5)
  np.testing.assert_allclose(ours32.variances, ours64.variances, rtol=1e-5)
  assert np.max(np.abs(ours32.means - ours64.means) / np.sqrt(ours64.variances)) < 1e-5


def test_one_pass_k2_path_equals_general_path():
  x = _bimodal(3)
  fast = _fit64(x, max_iter=40, tol=0.0)
  general = _fit64(x[:, None], max_iter=40, tol=0.0)
  np.testing.assert_allclose(fast.means, general.means[:, 0], rtol=1e-11)
  np.testing.assert_allclose(fast.variances, general.variances[:, 0], rtol=1e-11)
  np.testing.assert_allclose(fast.log_likelihood, general.log_likelihood, rtol=1e-12)


def test_blocked_pass_equals_one_pass():
  x = jnp.asarray(_bimodal(4, n=50_001), jnp.float32)
  fit = lambda block: gmm._fit_jit(
    x, None, None, None, jnp.float32(1e-6), n_components=2, max_iter=30, tol=1e-3, n_init=1,
    init_kind='quantile', block=block,
  )  # fmt: skip
  blocked, whole = fit(4096), fit(None)
  _assert_same(blocked, whole, rtol=1e-5)
  assert int(blocked.n_iter) == int(whole.n_iter)


# ------------------------------------------------------------------------- jit, vmap, weights


def test_jit_and_vmap_equal_eager():
  xs = np.stack([_bimodal(seed) for seed in range(4)]).astype(np.float32)
  eager = [gmm.fit(x) for x in xs]
  jitted = jax.jit(gmm.fit)
  batched = jax.vmap(gmm.fit)(jnp.asarray(xs))
  for i, one in enumerate(eager):
    _assert_same(jitted(xs[i]), one, rtol=1e-6)
    _assert_same(jax.tree.map(lambda a, i=i: a[i], batched), one, rtol=1e-5, atol=1e-6)
    assert int(batched.n_iter[i]) == int(one.n_iter)


def _pad(x: np.ndarray, weights: np.ndarray, fill: float = 0.0, n: int = 1024):
  """x and weights padded to n samples with weight 0 (one compilation for many tests)."""
  return np.r_[x, np.full(n - len(x), fill)], np.r_[weights, np.zeros(n - len(x))]


def test_zero_weight_entries_change_nothing():
  x = _bimodal(5)
  garbage = np.array([np.nan, np.inf, -1e30, 7.0])
  padded, weights = _pad(
    np.r_[x[:300], garbage, x[300:]], np.r_[np.ones(300), np.zeros(4), np.ones(700)], 1e9
  )
  reference = _fit64(x, max_iter=40, tol=0.0)
  _assert_same(_fit64(padded, weights=weights, max_iter=40, tol=0.0), reference, rtol=1e-10)
  jitted = jax.jit(lambda x, w: gmm.fit(x, weights=w))(padded.astype(np.float32), weights)
  reference = gmm.fit(x.astype(np.float32))
  _assert_same(jitted, reference, rtol=1e-5, atol=1e-6)
  assert int(jitted.n_iter) == int(reference.n_iter)


def test_padded_scores_sharded_over_devices_fit_like_the_host_array():
  x = _bimodal(8)
  padded, weights = _pad(x, np.ones(1000), np.nan)
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  x_dev, w_dev = jax.device_put((padded.astype(np.float32), weights.astype(np.float32)), sharding)
  fit = jax.jit(lambda x, w: gmm.fit(x, weights=w))(x_dev, w_dev)
  _assert_same(fit, gmm.fit(x.astype(np.float32)), rtol=1e-5, atol=1e-6)
  proba = gmm.mislabel_probability(fit, x_dev)
  assert proba.sharding.is_equivalent_to(sharding, 1) or proba.shape == (1024,)


def test_zero_weights_also_exclude_rows_of_2d_data():
  x = _bimodal(6, n=600, dims=3)
  padded = np.concatenate([x, np.full((25, 3), np.nan)])
  weights = np.r_[np.ones(600), np.zeros(25)]
  start = _start(x)
  ours = _fit64(padded, weights=weights, init=start, max_iter=25, tol=0.0)
  _assert_same(ours, _fit64(x, init=start, max_iter=25, tol=0.0), rtol=1e-10)


def test_fractional_weights_act_as_sample_counts():
  x = _bimodal(7)
  doubled = _fit64(np.r_[x[:800], x[:200]], max_iter=40, tol=0.0)
  weighted = _fit64(*_pad(x[:800], np.r_[np.ones(200), np.full(600, 0.5)]), max_iter=40, tol=0.0)
  for name in ('weights', 'means', 'variances'):
    np.testing.assert_allclose(getattr(weighted, name), getattr(doubled, name), rtol=1e-9)
  halved = _fit64(*_pad(x, np.full(1000, 0.5)), max_iter=40, tol=0.0)
  _assert_same(halved, _fit64(x, max_iter=40, tol=0.0), rtol=1e-10)


# ------------------------------------------------------------------------------ degenerate


DEGENERATE = {
  'constant': np.full(16, 3.25),
  'one_sample': np.array([1.5]),
  'two_distinct_values': np.array([1.0, 1.0, 2.0]),
  'single_cluster': np.random.default_rng(0).normal(5.0, 2.0, 16),
  'zeros': np.zeros(10),
  'offset_1e8': 1e8 + np.random.default_rng(1).normal(0.0, 1.0, 16),
  'scaled_1e-8': 1e-8 * _bimodal(2, n=16),
}


@pytest.mark.parametrize(('k', 'dtype'), [(2, np.float32), (3, np.float32), (2, np.float64)])
def test_degenerate_input_gives_finite_fits(k, dtype):
  # Each case is padded to 16 samples with zero weights, so one compilation serves all.
  for name, x in DEGENERATE.items():
    padded = np.r_[x, np.zeros(16 - len(x))].astype(dtype)
    weights = np.r_[np.ones(len(x)), np.zeros(16 - len(x))]
    with jax.enable_x64(bool(dtype == np.float64)):
      fit = gmm.fit(padded, n_components=k, weights=weights)
      proba = gmm.predict_proba(fit, padded)
      for field, value in fit._asdict().items():
        assert np.all(np.isfinite(value)), (name, field, value)
      assert np.all(np.asarray(fit.variances) > 0), name
      assert np.all(np.isfinite(proba)), name
      np.testing.assert_allclose(np.sum(proba, axis=1), 1, rtol=1e-5, err_msg=name)


def test_constant_data_fits_the_constant_like_sklearn():
  fit = _fit64(np.full(1000, -2.5), max_iter=40, tol=0.0)
  np.testing.assert_allclose(fit.means, [-2.5, -2.5])
  np.testing.assert_allclose(fit.variances, [1e-6, 1e-6], rtol=1e-6)


@pytest.mark.parametrize(
  ('dtype', 'offset', 'scale'),
  [
    (np.float64, 1e8, 1.0),
    (np.float64, 0.0, 1e-8),
    (np.float64, -1e8, 1e3),
    (np.float32, 1e8, 1e3),  # float32 steps are 8 at 1e8: the spread must be resolvable
    (np.float32, 0.0, 1e-8),
    (np.float32, -3e7, 1e2),
  ],
)
def test_offset_and_scale_do_not_change_the_fit(dtype, offset, scale):
  """Affine equivariance: fitting a + b x gives a + b * (the fit of x)."""
  shifted = (offset + scale * _bimodal(8)).astype(dtype)
  x = (shifted.astype(np.float64) - offset) / scale  # what the rounded data represent
  reg = 1e-6 * scale**2
  with jax.enable_x64(bool(dtype == np.float64)):
    ours = jax.tree.map(np.asarray, gmm.fit(shifted, reg_covar=reg, max_iter=40, tol=0.0))
  reference = _fit64(x, max_iter=40, tol=0.0)
  rtol = 1e-5 if dtype == np.float32 else 1e-8
  # Returned means are in the units of x, so they carry its rounding step at the offset.
  atol = max(rtol, 2 * abs(float(np.spacing(dtype(offset)))) / scale)
  np.testing.assert_allclose(ours.weights, reference.weights, rtol=rtol)
  np.testing.assert_allclose((ours.means - offset) / scale, reference.means, rtol=rtol, atol=atol)
  np.testing.assert_allclose(ours.variances / scale**2, reference.variances, rtol=rtol)


# --------------------------------------------------------------------------- input checking


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_naming_the_first_bad_index(bad):
  x = _bimodal(9, n=100)
  x[[17, 40]] = bad
  with pytest.raises(ValueError, match=rf'x\[17\] is {bad}'):
    gmm.fit(x)
  weights = np.ones(100)
  weights[17] = 0
  with pytest.raises(ValueError, match=r'x\[40\]'):
    gmm.fit(x, weights=weights)
  x2 = _bimodal(9, n=10, dims=2)
  x2[3, 1] = bad
  with pytest.raises(ValueError, match=r'x\[3, 1\]'):
    gmm.fit(x2)


def test_non_finite_input_under_jit_gives_nan_not_an_exception():
  x = _bimodal(9, n=100).astype(np.float32)
  x[5] = np.nan
  fit = jax.jit(gmm.fit)(np.r_[x, np.zeros(900, np.float32)])
  assert np.isnan(fit.log_likelihood)


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    (dict(init='em'), "unknown init 'em'"),
    (dict(n_init=3), 'need a key'),
    (dict(init='random'), 'need a key'),
    (dict(weights=np.ones(5)), r'weights must have shape \(100,\)'),
    (dict(weights=np.r_[np.ones(99), 1.5]), r'weights\[99\] is 1.5'),
    (dict(weights=np.zeros(100)), 'weights are all zero'),
    (dict(n_components=0), 'n_components'),
    (dict(max_iter=0), 'max_iter'),
    (dict(tol=-1.0), 'tol'),
  ],
)
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gmm.fit(_bimodal(0, n=100), **kwargs)


def test_init_with_wrong_shapes_raises():
  start = _start(_bimodal(0, n=100), 3)
  with pytest.raises(ValueError, match='init parameters must have shapes'):
    gmm.fit(_bimodal(0, n=100), init=start)


# ----------------------------------------------------------------------- options and helpers


def test_tol_zero_runs_exactly_max_iter():
  fit = gmm.fit(_bimodal(1), max_iter=40, tol=0.0)
  assert int(fit.n_iter) == 40 and not bool(fit.converged)


def test_restarts_never_do_worse_than_the_first_start():
  x = np.r_[_bimodal(2, n=900), np.random.default_rng(2).normal(9, 0.1, 100)].astype(np.float32)
  one = gmm.fit(x)
  many = gmm.fit(x, n_init=6, key=jax.random.key(1))
  again = gmm.fit(x, n_init=6, key=jax.random.key(1))
  assert float(many.log_likelihood) >= float(one.log_likelihood) - 1e-6
  _assert_same(many, again, rtol=0)


def test_random_init_is_reproducible_and_never_picks_zero_weight_samples():
  x, weights = _pad(_bimodal(3, n=600), np.ones(600), np.nan)
  x = x.astype(np.float32)
  a = gmm.fit(x, weights=weights, init='random', n_init=3, key=jax.random.key(5))
  b = gmm.fit(x, weights=weights, init='random', n_init=3, key=jax.random.key(5))
  _assert_same(a, b, rtol=0)
  assert bool(a.converged) and np.all(np.isfinite(a.means))


def test_kmeans_init_starts_near_the_optimum_of_unbalanced_data():
  rng = np.random.default_rng(0)
  x = np.r_[rng.normal(0, 1, 900), rng.normal(4, 1, 100)]
  best = SkMixture(2, random_state=0).fit(x[:, None]).score(x[:, None])
  fit = gmm.fit(x.astype(np.float32), init='kmeans')
  assert int(fit.n_iter) <= 5 and float(fit.log_likelihood) >= best - 1e-4
  padded, weights = _pad(x.astype(np.float32), np.ones(1000), np.nan)
  _assert_same(gmm.fit(padded, weights=weights, init='kmeans'), fit, rtol=1e-5, atol=1e-6)


def test_quantile_init_is_the_weighted_quantiles():
  quantiles = jax.jit(gmm._quantile_means, static_argnums=2)
  z = jnp.arange(1.0, 101.0)[:, None]
  np.testing.assert_array_equal(quantiles(z, None, 2)[:, 0], [25.0, 75.0])
  weights = jnp.r_[jnp.zeros(50), jnp.ones(50)]
  np.testing.assert_array_equal(quantiles(z, weights, 2)[:, 0], [63.0, 88.0])
  big = jnp.arange(1.0, 200_001.0)[:, None]  # above the sample size: evenly spaced samples
  np.testing.assert_allclose(quantiles(big, None, 2)[:, 0], [50_000, 150_000], rtol=1e-4)


def test_helpers_pick_the_highest_mean_component_in_any_order():
  x = _bimodal(4).astype(np.float32)
  fit = gmm.fit(x)
  flipped = jax.tree.map(lambda a: a[::-1] if np.ndim(a) else a, fit)
  ordered = gmm.sort_by_mean(flipped)
  assert np.all(np.diff(np.asarray(ordered.means)) > 0)
  hi = int(np.argmax(fit.means))
  for mixture in (fit, flipped, ordered):
    np.testing.assert_allclose(gmm.noise_fraction(mixture), fit.weights[hi])
    np.testing.assert_allclose(
      gmm.mislabel_probability(mixture, x), gmm.predict_proba(fit, x)[:, hi], rtol=1e-6
    )
    np.testing.assert_allclose(gmm.log_prob(mixture, x), gmm.log_prob(fit, x), rtol=1e-6)
  # Host (NumPy) mixtures work too, as the pipeline fetches them before reporting.
  host = jax.tree.map(np.asarray, ordered)
  assert float(gmm.noise_fraction(host)) == float(ordered.weights[1])


def test_mixture_is_a_pytree():
  fit = gmm.fit(_bimodal(0).astype(np.float32))
  assert len(jax.tree.leaves(fit)) == 6
  assert fit.n_iter.dtype == jnp.int32 and fit.converged.dtype == jnp.bool_


# ---------------------------------------------------------------------------------- property


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
  x=hnp.arrays(np.float64, 48, elements=st.floats(-100, 100, allow_subnormal=False)),
  k=st.sampled_from([2, 3]),
)
@hypothesis.example(x=np.r_[np.zeros(12), np.ones(36)], k=2)  # variances reach the floor
def test_log_likelihood_never_decreases_across_em_iterations(x, k):
  hypothesis.assume(np.ptp(x) > 1e-6)
  mixture = start = _start(x, k)
  for _ in range(8):
    step = _fit64(x, n_components=k, init=mixture, max_iter=1, tol=0.0, reg_covar=0.0)
    ll_before, ll_after = float(mixture.log_likelihood), float(step.log_likelihood)
    if mixture is not start:
      assert ll_after >= ll_before - 1e-9 * (1 + abs(ll_before)), (ll_before, ll_after)
    mixture = step
