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
needs_bfloat16 = pytest.mark.skipif(
  jnp.dtype(jnp.bfloat16) not in onednn.supported_dtypes(),
  reason='this CPU has no oneDNN bfloat16 convolution',
)


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


@needs_bfloat16
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


# R = 3 trials: (x, w) batching patterns of jax.vmap, and convolutions with both strides and
# both kinds of padding.
TRIALS = 3
IN_AXES = {'both batched': (0, 0), 'x shared': (None, 0), 'w shared': (0, None)}
TRIAL_CASES = {
  'stride 1 explicit': ((4, 8, 8, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),
  'stride 2 explicit': ((4, 9, 8, 5), (3, 3, 5, 6), (2, 2), ((1, 0), (0, 2))),
  'stride 2 SAME': ((3, 8, 8, 2), (5, 5, 2, 4), (2, 2), 'SAME'),
}


def _trial_operands(x_shape, w_shape, strides, padding, in_axes, dtype=jnp.float32):
  """x, w (stacked over trials where batched) and per-trial cotangents dy_RxNxHoxWoxO."""
  kx, kw, ky = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (TRIALS, *x_shape), dtype)
  w = jax.random.normal(kw, (TRIALS, *w_shape), dtype)
  dy_shape = _reference(x[0], w[0], strides, padding).shape
  dy = jax.random.normal(ky, (TRIALS, *dy_shape), dtype)
  return (x if in_axes[0] == 0 else x[0]), (w if in_axes[1] == 0 else w[0]), dy


def _per_trial_reference(x, w, strides, padding, in_axes, dy):
  """y, dx, dw of lax's convolution, one trial at a time, stacked."""
  trials = []
  for r in range(TRIALS):
    x_r, w_r = (x[r] if in_axes[0] == 0 else x), (w[r] if in_axes[1] == 0 else w)
    trials.append(_value_and_grads(_reference, x_r, w_r, strides, padding, dy[r]))
  return [jnp.stack(t) for t in zip(*trials, strict=True)]


@pytest.mark.parametrize('case', list(TRIAL_CASES))
@pytest.mark.parametrize('pattern', list(IN_AXES))
def test_vmapped_values_and_gradients_match_lax_per_trial(pattern, case):
  x_shape, w_shape, strides, padding = TRIAL_CASES[case]
  in_axes = IN_AXES[pattern]
  x, w, dy = _trial_operands(x_shape, w_shape, strides, padding, in_axes)
  per_trial = lambda x, w, dy: _value_and_grads(ONEDNN, x, w, strides, padding, dy)
  got = jax.jit(jax.vmap(per_trial, in_axes=(*in_axes, 0)))(x, w, dy)
  want = _per_trial_reference(x, w, strides, padding, in_axes, dy)
  for name, g, r in zip(('y', 'dx', 'dw'), got, want, strict=True):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4, err_msg=name)


def test_vmap_over_a_later_axis_gives_the_same():
  x, w, dy = _trial_operands((4, 8, 8, 5), (3, 3, 5, 6), (2, 2), 'SAME', IN_AXES['both batched'])
  per_trial = lambda x, w, dy: _value_and_grads(ONEDNN, x, w, (2, 2), 'SAME', dy)
  got = jax.jit(jax.vmap(per_trial, in_axes=(3, 4, 0)))(
    jnp.moveaxis(x, 0, 3), jnp.moveaxis(w, 0, 4), dy
  )
  want = _per_trial_reference(x, w, (2, 2), 'SAME', IN_AXES['both batched'], dy)
  for g, r in zip(got, want, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@needs_bfloat16
def test_vmapped_bfloat16_matches_float32_to_bfloat16_precision():
  in_axes = IN_AXES['both batched']
  x, w, dy = _trial_operands((8, 16, 16, 16), (3, 3, 16, 32), (1, 1), 'SAME', in_axes, jnp.bfloat16)
  per_trial = lambda x, w, dy: _value_and_grads(ONEDNN, x, w, (1, 1), 'SAME', dy)
  got = jax.jit(jax.vmap(per_trial))(x, w, dy)
  f32 = [a.astype(jnp.float32) for a in (x, w, dy)]
  want = _per_trial_reference(*f32[:2], (1, 1), 'SAME', in_axes, f32[2])
  for g, r in zip(got, want, strict=True):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(g.astype(jnp.float32), r, atol=0.02 * scale)


def _custom_calls(hlo: str) -> dict[str, int]:
  """How often each oneDNN target is called in lowered StableHLO text."""
  return {target: hlo.count(f'stablehlo.custom_call @{target}(') for target in onednn.TARGETS}


def test_vmapped_forward_and_backward_is_one_call_per_direction():
  in_axes = IN_AXES['both batched']
  x, w, dy = _trial_operands((4, 8, 8, 5), (3, 3, 5, 6), (1, 1), 'SAME', in_axes)
  per_trial = lambda x, w, dy: _value_and_grads(ONEDNN, x, w, (1, 1), 'SAME', dy)
  hlo = jax.jit(jax.vmap(per_trial)).lower(x, w, dy).as_text()
  assert _custom_calls(hlo) == dict.fromkeys(onednn.TARGETS, 1)
  # Not one call looped over the trials either (vmap_method='sequential' lowers to a while).
  assert 'stablehlo.while' not in hlo
  assert f'tensor<{TRIALS}x4x8x8x5xf32>' in hlo


def test_nested_vmap_and_its_summed_gradients_match_lax():
  # Outer vmap: 2 batches of images over one set of trials; inner: 3 trials' kernels.
  x = jax.random.normal(jax.random.key(2), (2, 4, 8, 8, 3))
  w = jax.random.normal(jax.random.key(3), (TRIALS, 3, 3, 3, 4))

  def grads(conv):
    def loss(x, w):
      y = conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
      return jnp.sum(jnp.sin(y))

    nested = jax.vmap(jax.vmap(loss, in_axes=(None, 0)), in_axes=(0, None))
    return jax.jit(jax.grad(lambda x, w: jnp.sum(nested(x, w)), argnums=(0, 1)))

  got = grads(ONEDNN)(x, w)
  for g, r in zip(got, grads(_reference)(x, w), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
  hlo = grads(ONEDNN).lower(x, w).as_text()
  assert _custom_calls(hlo) == dict.fromkeys(onednn.TARGETS, 1)


def test_vmap_inside_shard_map_matches_lax():
  mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])
  x = jax.random.normal(jax.random.key(4), (TRIALS, 4, 8, 8, 3))
  w = jax.random.normal(jax.random.key(5), (TRIALS, 3, 3, 3, 4))
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(None, 'data')))

  def grad_fn(conv):
    def per_device(x, w):
      loss = lambda x, w: jnp.sum(conv(x, w, (2, 2), 'SAME', dimension_numbers=NHWC) ** 2)
      return jax.vmap(jax.grad(loss, argnums=(0, 1)))(x, w)

    specs = (P(None, 'data'), P())
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=specs))

  for got, want in zip(grad_fn(ONEDNN)(x, w), grad_fn(_reference)(x, w), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  hlo = grad_fn(ONEDNN).lower(x, w).as_text()
  assert _custom_calls(hlo) == dict.fromkeys(onednn.TARGETS, 1)


def test_vmapped_lenet_matches_xla_convolutions(monkeypatch):
  net = models.get_model('lenet', 10)
  x = jax.random.normal(jax.random.key(6), (TRIALS, 2, 16, 16, 3))
  # Random parameters of each leaf's shape at 1/sqrt(fan-in) (compiling net.init takes longer).
  rng = np.random.default_rng(7)
  variables = jax.tree.map(
    lambda s: jnp.asarray(
      rng.normal(size=(TRIALS, *s.shape)) / np.sqrt(np.prod(s.shape[:-1])), s.dtype
    ),
    jax.eval_shape(lambda: net.init(jax.random.key(7), x[0], train=False)),
  )

  def value_and_grad(variables, x):
    loss = lambda variables: jnp.sum(jnp.sin(net.apply(variables, x)))
    return jax.value_and_grad(loss)(variables)

  def calls(fn, *args):
    hlo = fn.lower(*args).as_text()
    assert 'stablehlo.while' not in hlo
    return _custom_calls(hlo)

  # R trials make as many oneDNN calls as one trial does. (Each jit is a new function: the
  # convolution is chosen when the model is traced.)
  single = calls(jax.jit(value_and_grad), jax.tree.map(lambda v: v[0], variables), x[0])
  assert single['aul_onednn_conv_forward'] > 0
  trials = jax.jit(jax.vmap(value_and_grad))
  assert calls(trials, variables, x) == single
  got = trials(variables, x)
  monkeypatch.setattr(layers, 'fast_conv_general_dilated', lambda: None)  # lax's convolutions
  xla = jax.jit(jax.vmap(value_and_grad))
  assert set(calls(xla, variables, x).values()) == {0}
  want = xla(variables, x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_without_bfloat16_on_the_cpu_bfloat16_convolutions_fall_back_to_lax(monkeypatch):
  monkeypatch.setattr(onednn, 'supported_dtypes', lambda: onednn.DTYPES[:1])
  conv = layers.fast_conv_general_dilated()
  assert conv is layers.ONEDNN_FLOAT32_CONV_GENERAL_DILATED
  x, w, dy = _operands((2, 8, 8, 4), (3, 3, 4, 8), (1, 1), 'SAME', jnp.bfloat16)
  got = jax.jit(_value_and_grads, static_argnums=(0, 3, 4))(conv, x, w, (1, 1), 'SAME', dy)
  want = _value_and_grads(lax.conv_general_dilated, x, w, (1, 1), 'SAME', dy)
  for g, r in zip(got, want, strict=True):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))
