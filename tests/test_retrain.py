"""Retraining methods: weights, objectives, co-teaching selection, every method end to end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from aul_jax import coteaching, losses, pipeline, retrain, train
from tests.test_pipeline import load_config


def test_aul_weights_are_the_clean_probability():
  p = np.array([0.0, 0.25, 0.9, 1.0])
  np.testing.assert_allclose(retrain.example_weights('aul', p, np.zeros(4, bool)), 1 - p)


def test_oracle_weights_are_the_clean_mask_and_others_are_one():
  mask = np.array([True, False, False, True])
  np.testing.assert_array_equal(retrain.example_weights('oracle', None, mask), [0, 1, 1, 0])
  for method in ('standard', 'random', 'reed_hard', 'coteaching'):
    np.testing.assert_array_equal(retrain.example_weights(method, None, mask), np.ones(4))


def test_random_weights_are_rectified_normal_and_redrawn():
  w1 = np.asarray(retrain.rectified_normal_weights(jax.random.key(0), 20000))
  w2 = np.asarray(retrain.rectified_normal_weights(jax.random.key(1), 20000))
  assert (w1 >= 0).all() and abs((w1 == 0).mean() - 0.5) < 0.02
  assert abs(w1.mean() - 1 / np.sqrt(2 * np.pi)) < 0.01  # E[max(0, z)] for z ~ N(0, 1).
  assert not np.array_equal(w1, w2)


def test_learning_rate_drops_scale_with_the_run_length():
  assert retrain.lr_drop_epochs(300, (0.5, 0.75)) == (150, 225)
  assert retrain.lr_drop_epochs(40, (0.5, 0.75)) == (20, 30)


def test_hard_bootstrap():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
  labels = jnp.array([0, 2])
  np.testing.assert_allclose(
    losses.hard_bootstrap(1.0)(logits, labels), losses.cross_entropy(logits, labels), rtol=1e-6
  )
  log_p = jax.nn.log_softmax(logits)
  expected = -(0.8 * log_p[jnp.arange(2), labels] + 0.2 * log_p[jnp.arange(2), jnp.array([0, 1])])
  np.testing.assert_allclose(losses.hard_bootstrap(0.8)(logits, labels), expected, rtol=1e-6)


def test_forget_rate_ramps_linearly_then_stays():
  rates = [float(coteaching.forget_rate(jnp.array(e), 0.4, 10)) for e in (0, 5, 10, 50)]
  assert rates == pytest.approx([0.0, 0.2, 0.4, 0.4])


@pytest.mark.parametrize('num_devices', [1, 4])
def test_small_loss_selection_keeps_the_smallest_over_the_global_batch(num_devices):
  loss = jnp.array([5.0, 1.0, 4.0, 0.5, 9.0, 2.0, 3.0, 7.0])
  real = jnp.array([True] * 7 + [False])  # The last entry is padding.
  mesh = train.make_mesh(jax.devices()[:num_devices])
  select = jax.jit(
    jax.shard_map(
      functools.partial(coteaching.small_loss_selection, keep_fraction=jnp.float32(3 / 7)),
      mesh=mesh,
      in_specs=(P(train.DATA_AXIS), P(train.DATA_AXIS)),
      out_specs=P(train.DATA_AXIS),
    )
  )
  sharded = jax.sharding.NamedSharding(mesh, P(train.DATA_AXIS))
  keep = np.asarray(select(jax.device_put(loss, sharded), jax.device_put(real, sharded)))
  np.testing.assert_array_equal(np.flatnonzero(keep), [1, 3, 5])  # Losses 1.0, 0.5, 2.0.


@pytest.mark.parametrize('method', retrain.METHODS)
def test_every_method_runs_and_reports_its_test_error(method, tmp_path):
  config = load_config('digits')
  config.method = method
  config.aul.epochs = 2
  config.retrain.epochs = 2
  summary = pipeline.run(config, str(tmp_path), log=lambda _: None)
  assert summary['method'] == method
  assert 0.0 <= summary['test_error'] <= 1.0
  assert ('noise_estimate' in summary) == (method == 'aul')
  assert (tmp_path / 'scores.csv').exists() and (tmp_path / 'summary.json').exists()


def test_baselines_need_retraining_epochs(tmp_path):
  config = load_config('digits')
  config.method = 'standard'
  with pytest.raises(ValueError, match='retrain.epochs > 0'):
    pipeline.run(config, str(tmp_path / 'run'), log=lambda _: None)
  assert not (tmp_path / 'run').exists()
