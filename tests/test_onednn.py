"""The oneDNN convolution (models/onednn.py): lax's values and gradients, under shard_map and
inside a scan, the zoo's default on a CPU, and a clear fallback where it cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from aul_jax import models
from aul_jax.models import conv as conv_lib
from aul_jax.models import layers, onednn
from tests.test_benchmarks import CONV_CASES, NHWC

pytestmark = pytest.mark.skipif(
  onednn.unavailable_reason() is not None, reason=f'oneDNN: {onednn.unavailable_reason()}'
)

ONEDNN = layers.ONEDNN_CONV_GENERAL_DILATED


def _reference(x, w, strides, padding, dimension_numbers=NHWC):
  return lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=dimension_numbers, precision='highest'
  )


def _value_and_grads(conv, x, w, strides, padding, dy):
  y, vjp = jax.vjp(lambda x, w: conv(x, w, strides, padding, dimension_numbers=NHWC), x, w)
  return (y, *vjp(dy))


def _operands(x_shape, w_shape, strides, padding, dtype=jnp.float32):
  kx, kw, ky = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape, dtype), jax.random.normal(kw, w_shape, dtype)
  dy = jax.random.normal(ky, _reference(x, w, strides, padding).shape, dtype)
  return x, w, dy


@pytest.mark.parametrize('case', list(CONV_CASES))
def test_value_and_gradients_match_lax(case):
  x_shape, w_shape, strides, padding = CONV_CASES[case]
  x, w, dy = _operands(x_shape, w_shape, strides, padding)
  got = jax.jit(_value_and_grads, static_argnums=(0, 3, 4))(ONEDNN, x, w, strides, padding, dy)
  want = _value_and_grads(_reference, x, w, strides, padding, dy)
  for name, g, r in zip(('y', 'dx', 'dw'), got, want, strict=True):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4, err_msg=name)


def test_bfloat16_matches_float32_to_bfloat16_precision():
  x, w, dy = _operands((8, 16, 16, 16), (3, 3, 16, 32), (1, 1), 'SAME', jnp.bfloat16)
  got = _value_and_grads(ONEDNN, x, w, (1, 1), 'SAME', dy)
  want = _value_and_grads(
    _reference, *(a.astype(jnp.float32) for a in (x, w)), (1, 1), 'SAME', dy.astype(jnp.float32)
  )
  for g, r in zip(got, want, strict=True):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(g.astype(jnp.float32), r, atol=0.02 * scale)


def test_inside_a_scan_gives_the_same_as_outside():
  x, w, dy = _operands((4, 8, 8, 3), (3, 3, 3, 5), (1, 1), 'SAME')
  once = _value_and_grads(ONEDNN, x, w, (1, 1), 'SAME', dy)

  def body(carry, _):
    return carry, _value_and_grads(ONEDNN, x, w, (1, 1), 'SAME', dy)

  _, scanned = jax.jit(lambda: lax.scan(body, 0, None, length=3))()
  for a, b in zip(once, scanned, strict=True):
    np.testing.assert_array_equal(np.broadcast_to(a, b.shape), b)


def test_under_shard_map_the_weight_gradient_is_summed_over_devices():
  mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])
  x, w, _ = _operands((4, 8, 8, 3), (3, 3, 3, 4), (1, 1), 'SAME')
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P('data')))

  def grad_fn(conv):
    def per_device(x, w):
      loss = lambda x, w: jnp.sum(conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC) ** 2)
      return jax.grad(loss, argnums=(0, 1))(x, w)

    return jax.jit(
      jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P()), out_specs=(P('data'), P()))
    )

  for got, want in zip(grad_fn(ONEDNN)(x, w), grad_fn(_reference)(x, w), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_other_dtypes_fall_back_to_lax():
  x = jnp.ones((2, 6, 6, 3), jnp.float16)
  w = jnp.ones((3, 3, 3, 4), jnp.float16)
  hlo = jax.jit(lambda x, w: ONEDNN(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)).lower(x, w)
  assert 'aul_onednn' not in hlo.as_text()


def test_zoo_models_train_through_onednn_on_cpu():
  model = models.get_model('resnet20', 10)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(logits)

  hlo = jax.jit(jax.grad(loss)).lower(variables['params']).as_text()
  for target in onednn.TARGETS:
    assert target in hlo


def test_missing_library_is_named(monkeypatch, tmp_path):
  monkeypatch.setattr(onednn, '_onednn_prefix', lambda: tmp_path)
  with pytest.raises(onednn.OnednnUnavailable, match='libdnnl.so not found'):
    onednn.library_path()


def test_failed_build_says_so(monkeypatch, tmp_path):
  monkeypatch.setenv('AUL_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')  # A "compiler" that always fails.
  with pytest.raises(onednn.OnednnUnavailable, match='building onednn_conv.cc failed'):
    onednn.library_path()
  assert list(tmp_path.iterdir()) == []  # Nothing half-written left in the cache.


def test_unavailable_falls_back_to_canonical_xla_convolutions(monkeypatch):
  monkeypatch.setattr(onednn, 'unavailable_reason', lambda: 'no compiler')
  assert layers.fast_conv_general_dilated() is conv_lib.canonical_conv_general_dilated


def test_environment_variable_turns_it_off(monkeypatch):
  monkeypatch.setenv('AUL_JAX_ONEDNN', '0')
  onednn.unavailable_reason.cache_clear()
  try:
    assert onednn.unavailable_reason() == 'turned off by AUL_JAX_ONEDNN=0'
  finally:
    monkeypatch.delenv('AUL_JAX_ONEDNN')
    onednn.unavailable_reason.cache_clear()
  assert onednn.unavailable_reason() is None


@pytest.mark.parametrize('model', ['lenet', 'resnet20'])
def test_training_gives_the_aul_of_xla_convolutions(model):
  from benchmarks import train_throughput

  data = train_throughput.random_data(32 * 3)
  aul = {}
  for impl in ('onednn', 'canonical_vjp'):
    epoch = train_throughput.JaxEpoch(
      model, batch_size=32, steps=3, conv=impl, dtype='float32', num_devices=2, data=data
    )
    for _ in range(2):
      aul[impl] = np.asarray(epoch())
  # Six SGD steps amplify the convolutions' float32 rounding differences to ~3e-4.
  np.testing.assert_allclose(aul['onednn'], aul['canonical_vjp'], rtol=2e-3)


def test_the_wheels_onednn_is_the_one_loaded():
  onednn.load()
  with open('/proc/self/maps') as maps:
    mapped = {line.split()[-1] for line in maps if 'libdnnl' in line}
  assert mapped == {str(onednn._onednn_prefix() / 'lib' / 'libdnnl.so.3')}
