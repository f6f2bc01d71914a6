"""Model zoo: forward passes, parameter counts, and BatchNorm sync under shard_map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aul_jax.models import MODELS, count_params, get_model

NO_BATCHNORM = ('lenet', 'mlp')
SMALL = ('densenet_bc_small', 'lenet', 'mlp', 'resnet20')
# (model, input shape): every model on CIFAR-sized images; the small ones also on 8x8 digits.
FORWARD_CASES = [
  pytest.param(name, shape, id=f'{name}-{"x".join(map(str, shape))}')
  for shape, names in [((2, 32, 32, 3), sorted(MODELS)), ((4, 8, 8, 1), SMALL)]
  for name in names
]


def _images(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape)


# XLA's CPU compile of these deep nets, not running them, dominates test time; skipping
# LLVM optimisation halves it and leaves the numbers checked here unchanged.
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _init(model, x):
  return _jit(functools.partial(model.init, train=False))(jax.random.key(0), x)


def _abstract_variables(model, shape=(1, 32, 32, 3)):
  """Variables as shapes only: parameter counts without compiling or running anything."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


@pytest.mark.parametrize('name,shape', FORWARD_CASES)
def test_forward_train_and_eval(name, shape):
  model = get_model(name, num_classes=10)

  @_jit
  def init_and_forward(x):  # One compile per case: init, a train pass and an eval pass.
    variables = model.init(jax.random.key(0), x, train=False)
    logits_train, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return variables, logits_train, updates, model.apply(variables, x, train=False)

  variables, logits_train, updates, logits_eval = init_and_forward(_images(shape))
  for logits in (logits_train, logits_eval):
    assert logits.shape == (shape[0], 10)
    assert logits.dtype == jnp.float32
    assert np.isfinite(logits).all()
  if name in NO_BATCHNORM:
    assert 'batch_stats' not in variables
  else:
    # Every BatchNorm must update its running mean and variance in train mode.
    changed = jax.tree.map(
      lambda old, new: not np.allclose(old, new), variables['batch_stats'], updates['batch_stats']
    )
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize('shape', [(3, 8, 8, 1), (3, 9, 13, 2)])
@pytest.mark.parametrize('name', sorted(MODELS))
def test_every_model_takes_small_and_odd_inputs(name, shape):
  """Shapes only (nothing compiled): 8x8 digits and odd sizes must not pool down to zero."""
  model = get_model(name, num_classes=7)

  def init_and_forward(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return model.apply(variables, x, train=True, mutable=['batch_stats'])[0]

  logits = jax.eval_shape(init_and_forward, jnp.zeros(shape))
  assert (logits.shape, logits.dtype) == ((shape[0], 7), jnp.float32)


@pytest.mark.parametrize(
  'name,num_classes,expected',
  [
    # He et al. 2016 quote 0.27M and 0.46M; these are the exact option-A counts.
    ('resnet20', 10, 269_722),
    ('resnet32', 10, 464_154),
    ('resnet44', 10, 658_586),
    ('resnet56', 10, 853_018),
    ('resnet110', 10, 1_727_962),
    # torchvision.models.densenet121() has exactly this many parameters.
    ('densenet121', 1000, 7_978_856),
    # torchvision.models.resnet50() has exactly this many parameters.
    ('resnet50', 1000, 25_557_032),
    ('densenet_bc', 10, 769_162),
    ('densenet_bc_small', 10, 176_122),
  ],
)
def test_param_counts(name, num_classes, expected):
  got = count_params(_abstract_variables(get_model(name, num_classes)))
  assert got == expected, (
    f'{name} has {got:,} params, expected {expected:,}. If the architecture change was '
    'intended, check it against the paper and update the expected value here.'
  )


def test_densenet_bc_default_is_bc100_k12():
  got = count_params(_abstract_variables(get_model('densenet_bc', 10)))
  assert 750_000 <= got <= 820_000


def test_kwargs_reach_the_constructor():
  model = get_model('densenet_bc', 10, depth=40, growth_rate=12)
  small = get_model('densenet_bc_small', 10)
  assert count_params(_abstract_variables(model)) == count_params(_abstract_variables(small))
  mlp = get_model('mlp', 3, hidden_sizes=(7,))
  assert count_params(_abstract_variables(mlp, (1, 8, 8, 1))) == 64 * 7 + 7 + 7 * 3 + 3


def test_unknown_model_lists_known_names():
  with pytest.raises(ValueError, match="unknown model 'vgg'; known: densenet121, densenet_bc,"):
    get_model('vgg', 10)


@pytest.mark.parametrize(
  'name,kwargs', [('resnet20', {'depth': 21}), ('densenet_bc', {'depth': 41})]
)
def test_bad_depth_is_rejected(name, kwargs):
  with pytest.raises(ValueError, match='depth must be 6n'):
    get_model(name, 10, **kwargs)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = get_model('resnet20', 10, dtype=jnp.bfloat16)
  x = _images((2, 8, 8, 1))
  variables = _init(model, x)
  logits, updates = _jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
    variables, x
  )
  assert logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  leaves = jax.tree.leaves(variables['params']) + jax.tree.leaves(updates['batch_stats'])
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)


@pytest.mark.parametrize('name', ['resnet20', 'densenet_bc_small'])
def test_batchnorm_syncs_across_devices_under_shard_map(name):
  mesh = jax.make_mesh((4,), ('data',))
  # The mesh axis is Explicit, so the batch must really be split before shard_map sees it.
  x = _images((8, 8, 8, 1))
  x_split = jax.device_put(x, NamedSharding(mesh, P('data')))
  synced = get_model(name, 10, bn_axis_name='data')
  single = get_model(name, 10)
  variables = _init(single, x)

  def train_forward(model, variables, x):
    return model.apply(variables, x, train=True, mutable=['batch_stats'])

  sharded = jax.shard_map(
    functools.partial(train_forward, synced),
    mesh=mesh,
    in_specs=(P(), P('data')),
    out_specs=(P('data'), P()),
  )
  logits, updates = _jit(sharded)(variables, x_split)
  want_logits, want_updates = _jit(functools.partial(train_forward, single))(variables, x)

  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5),
    updates,
    want_updates,
  )
