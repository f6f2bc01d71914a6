"""The data-parallel train step, the whole-epoch scan and the on-device AUL accumulator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aul_jax import augment, aul, losses
from aul_jax import train as train_lib
from aul_jax.errors import DivergedError

NUM_EXAMPLES = 203  # Not a multiple of the batch: the last batch of each epoch is partial.
BATCH = 64


class TinyNet(nn.Module):
  """Dense + synchronised BatchNorm: small, but exercises the cross-device statistics."""

  use_batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    if self.use_batch_norm:
      x = nn.BatchNorm(use_running_average=not train, axis_name=train_lib.DATA_AXIS)(x)
    return nn.Dense(10)(nn.relu(x))


def _data(image_shape=(8, 8, 1), seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.normal(size=(NUM_EXAMPLES, *image_shape)).astype(np.float32),
    'label': rng.integers(0, 10, NUM_EXAMPLES).astype(np.int32),
    'weight': np.ones(NUM_EXAMPLES, np.float32),
  }


def _run(num_devices, model, data, *, epochs=2, learning_rate=0.1, augment_images=False):
  mesh = train_lib.make_mesh(jax.devices()[:num_devices])
  optimizer = train_lib.make_optimizer(
    learning_rate=learning_rate, momentum=0.9, weight_decay=1e-4, steps_per_epoch=4
  )
  state = train_lib.create_train_state(model, optimizer, data['image'].shape[1:], jax.random.key(0))
  state = train_lib.replicate(state, mesh)
  aul_state = train_lib.init_aul_state(mesh, NUM_EXAMPLES, epochs, 'float32')
  run_epoch = train_lib.make_train_epoch(
    train_lib.make_step(model, optimizer),
    mesh,
    num_examples=NUM_EXAMPLES,
    batch_size=BATCH,
    augment_images=augment_images,
  )
  return train_lib.train_epochs(
    run_epoch,
    state,
    aul_state,
    train_lib.replicate(data, mesh),
    jax.random.key(1),
    num_epochs=epochs,
    num_examples=NUM_EXAMPLES,
    on_epoch=lambda epoch, metrics: None,
  )


def _aul(aul_state):
  return train_lib.host_statistics(aul_state)['aul']


def test_epoch_order_visits_every_example_once_and_masks_padding():
  index, mask = train_lib.epoch_order(jax.random.key(3), NUM_EXAMPLES, BATCH)
  assert index.shape == mask.shape == (4, BATCH)
  real = np.asarray(index)[np.asarray(mask)]
  np.testing.assert_array_equal(np.sort(real), np.arange(NUM_EXAMPLES))
  assert int(mask.sum()) == NUM_EXAMPLES
  assert not np.asarray(mask)[-1, NUM_EXAMPLES - 3 * BATCH :].any()


def test_every_example_counted_exactly_once_including_last_partial_batch():
  # With a zero learning rate the model never changes, so one epoch's AUL must equal each
  # example's loss under the initial model: counting an example twice (or dropping it) fails.
  model = TinyNet(use_batch_norm=False)
  data = _data()
  state, aul_state = _run(1, model, data, epochs=1, learning_rate=0.0)
  logits = model.apply({'params': state.params}, data['image'], train=False)
  expected = losses.cross_entropy(logits, data['label'])
  np.testing.assert_allclose(_aul(aul_state), expected, rtol=1e-5)


@pytest.mark.parametrize('augment_images', [False, True])
def test_one_and_four_devices_give_the_same_aul(augment_images):
  shape = (32, 32, 3) if augment_images else (8, 8, 1)
  data = _data(shape)
  _, one = _run(1, TinyNet(), data, augment_images=augment_images)
  state4, four = _run(4, TinyNet(), data, augment_images=augment_images)
  np.testing.assert_allclose(_aul(one), _aul(four), rtol=1e-4, atol=1e-5)
  # Split over the devices: each holds its ceil(203 / 4) = 51 rows, the last one padding.
  assert [shard.data.shape for shard in four.aul_N.addressable_shards] == [(51,)] * 4
  assert not np.asarray(four.aul_N)[NUM_EXAMPLES:].any()


def test_history_rows_sum_to_the_aul():
  _, aul_state = _run(1, TinyNet(), _data(), epochs=3)
  history = train_lib.host_history(aul_state)
  assert history.shape == (NUM_EXAMPLES, 3)
  np.testing.assert_allclose(history.sum(1), _aul(aul_state), rtol=1e-5)
  assert (history > 0).all()


def test_training_lowers_the_loss():
  _, aul_state = _run(1, TinyNet(), _data(), epochs=8)
  history = train_lib.host_history(aul_state)
  assert history[:, -1].mean() < 0.7 * history[:, 0].mean()


def test_nonfinite_loss_raises_with_epoch_and_step():
  data = _data()
  data['image'][150] = np.nan
  with pytest.raises(DivergedError, match=r'epoch 1, step \d'):
    _run(1, TinyNet(use_batch_norm=False), data, epochs=1)


def test_zero_weight_examples_get_no_gradient():
  model = TinyNet(use_batch_norm=False)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  data = _data()
  images, labels = jnp.asarray(data['image'][:8]), jnp.asarray(data['label'][:8])

  def loss(params, images, weights):
    logits = model.apply({'params': params}, images)
    return losses.weighted_mean(losses.cross_entropy(logits, labels), weights)

  weights = jnp.array([1, 1, 1, 1, 0, 0, 0, 0], jnp.float32)
  grad = jax.grad(loss)(params, images, weights)
  # Changing the zero-weight examples arbitrarily must not change the gradient.
  grad_changed = jax.grad(loss)(params, images.at[4:].set(100.0), weights)
  jax.tree.map(np.testing.assert_allclose, grad, grad_changed)
  no_grad = jax.grad(loss)(params, images, jnp.zeros(8))
  assert all(np.all(g == 0) for g in jax.tree.leaves(no_grad))


def test_weighted_mean_is_sum_wl_over_sum_w():
  loss = jnp.array([1.0, 2.0, 3.0])
  assert float(losses.weighted_mean(loss, jnp.array([1.0, 0.0, 1.0]))) == pytest.approx(2.0)
  assert float(losses.weighted_mean(loss, jnp.array([0.5, 0.5, 0.0]))) == pytest.approx(1.5)
  assert float(losses.weighted_mean(loss, jnp.zeros(3))) == 0.0


def test_scatter_losses_ignores_padding():
  epoch_loss = aul.scatter_losses(
    jnp.zeros(4), jnp.array([2, 0, 2]), jnp.array([1.0, 2.0, 5.0]), jnp.array([True, True, False])
  )
  np.testing.assert_array_equal(epoch_loss, [2.0, 0.0, 1.0, 0.0])


def test_augmentation_is_a_shifted_crop_or_its_mirror():
  image = jnp.arange(32 * 32 * 3, dtype=jnp.float32).reshape(1, 32, 32, 3) + 1
  keys = jax.random.split(jax.random.key(0), 16)
  out = np.asarray(augment.augment_batch(jnp.repeat(image, 16, 0), keys))
  padded = np.pad(np.asarray(image[0]), ((4, 4), (4, 4), (0, 0)))
  for crop in out:
    candidates = [padded[t : t + 32, s : s + 32] for t in range(9) for s in range(9)]
    assert any(np.array_equal(crop, c) or np.array_equal(crop, c[:, ::-1]) for c in candidates)
  assert len({o.tobytes() for o in out}) > 8  # Different keys, different crops.
  np.testing.assert_array_equal(out, augment.augment_batch(jnp.repeat(image, 16, 0), keys))


@pytest.mark.parametrize('num_devices, augment_images', [(1, False), (4, True)])
def test_streamed_epochs_match_device_resident_epochs(num_devices, augment_images):
  shape = (32, 32, 3) if augment_images else (8, 8, 1)
  data = _data(shape)
  _, resident = _run(num_devices, TinyNet(), data, augment_images=augment_images)
  mesh = train_lib.make_mesh(jax.devices()[:num_devices])
  optimizer = train_lib.make_optimizer(
    learning_rate=0.1, momentum=0.9, weight_decay=1e-4, steps_per_epoch=4
  )
  state = train_lib.create_train_state(TinyNet(), optimizer, shape, jax.random.key(0))
  loaded = []

  def load_images(indices):
    loaded.append(len(indices))
    return data['image'][indices]

  run_epoch = train_lib.make_streamed_train_epoch(
    train_lib.make_step(TinyNet(), optimizer),
    mesh,
    load_images,
    num_examples=NUM_EXAMPLES,
    batch_size=BATCH,
    augment_images=augment_images,
  )
  small = {k: v for k, v in data.items() if k != 'image'}
  _, streamed = train_lib.train_epochs(
    run_epoch,
    train_lib.replicate(state, mesh),
    train_lib.init_aul_state(mesh, NUM_EXAMPLES, 2, 'float32'),
    train_lib.replicate(small, mesh),
    jax.random.key(1),
    num_epochs=2,
    num_examples=NUM_EXAMPLES,
    on_epoch=lambda epoch, metrics: None,
  )
  np.testing.assert_allclose(_aul(streamed), _aul(resident), rtol=1e-5)
  # Each device's loader call fetches only that device's slice of a batch.
  assert max(loaded) == BATCH // num_devices


def test_predict_gives_eval_mode_probabilities_of_every_example():
  model = TinyNet()
  data = _data()
  state, _ = _run(4, model, data, epochs=1)
  predict = train_lib.make_predict(
    model, train_lib.make_mesh(jax.devices()[:4]), num_examples=NUM_EXAMPLES, batch_size=BATCH
  )
  probs = np.asarray(predict(state, jnp.asarray(data['image'])))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  expected = jax.nn.softmax(model.apply(variables, data['image'], train=False))
  assert probs.shape == (NUM_EXAMPLES, 10)
  np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


class _AsyncValue:
  """A device value that is ready at `ready_at` (perf_counter); reading it waits until then."""

  def __init__(self, value, ready_at):
    self.value, self.ready_at = value, ready_at

  def __array__(self, dtype=None, copy=None):
    import time

    time.sleep(max(0.0, self.ready_at - time.perf_counter()))
    return np.asarray(self.value, dtype)


def test_reported_throughput_counts_one_epoch_on_an_asynchronous_device():
  # Dispatch returns at once and each epoch runs 0.2 s after the previous one, as on a GPU:
  # every epoch must report ~N / 0.2 s, not the ~2 epochs that lie between its dispatch
  # and the arrival of its metrics.
  import time

  epoch_s, finished = 0.2, [time.perf_counter()]

  def run_epoch(state, aul_state, data, key, epoch):
    finished.append(max(finished[-1], time.perf_counter()) + epoch_s)
    ready = finished[-1]
    stats = {
      'loss_sum': _AsyncValue(1.0, ready),
      'correct': _AsyncValue(1, ready),
      'first_nonfinite_step': _AsyncValue(-1, ready),
    }
    return state, aul_state, stats

  reported = []
  train_lib.train_epochs(
    run_epoch,
    None,
    None,
    None,
    None,
    num_epochs=4,
    num_examples=1000,
    on_epoch=lambda epoch, metrics: reported.append(metrics['images_per_s']),
  )
  assert len(reported) == 4
  for rate in reported:
    assert 1000 / epoch_s * 0.7 < rate < 1000 / epoch_s * 1.3, reported
