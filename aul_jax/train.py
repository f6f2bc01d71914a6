"""Data-parallel training: a per-device train step under `jax.shard_map`, one compiled epoch.

The per-device programming model is pmap's (collectives over a 'data' axis), written with
`jax.shard_map` under `jax.jit` on a 1-D mesh. Training data live on the device; an epoch
(shuffle, augmentation, every step, the AUL scatter) is one `lax.scan`, one host dispatch.
"""

import concurrent.futures
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aul_jax import augment, aul, checkpointing, dynamics, losses, metrics
from aul_jax.errors import DivergedError

DATA_AXIS = 'data'

# objective(logits_BxK, labels_B) -> per-example loss_B.
Objective = Callable[[jax.Array, jax.Array], jax.Array]
# step(state, batch, epoch) -> (state, per-example {'loss', 'margin', 'confidence', 'correct'}),
# per device (dynamics.PER_EXAMPLE; see `dynamics.per_example`).
StepFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[Any, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all of them) whose axis is the data axis."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places every array of `tree` on every device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def make_optimizer(
  *,
  learning_rate: float,
  momentum: float,
  weight_decay: float,
  steps_per_epoch: int,
  lr_drop_epochs: Sequence[int] = (),
  lr_drop_factor: float = 0.1,
) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (as in PyTorch), step-wise LR drops at epochs."""
  schedule = optax.piecewise_constant_schedule(
    learning_rate, {int(e) * steps_per_epoch: lr_drop_factor for e in lr_drop_epochs}
  )
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.sgd(schedule, momentum=momentum),
  )


def create_train_state(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  key: jax.Array,
) -> TrainState:
  """Fresh parameters, batch statistics and optimizer state for `model`."""

  @jax.jit
  def init(key):
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=optimizer.init(params),
    )

  return init(key)


def apply_gradients(
  state: TrainState, grads: Any, updates: dict, optimizer: optax.GradientTransformation
) -> TrainState:
  """One optimizer update, plus the BatchNorm statistics that the forward pass produced."""
  param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, param_updates),
    batch_stats=updates.get('batch_stats', state.batch_stats),
    opt_state=opt_state,
  )


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  objective: Objective = losses.cross_entropy,
  axis_name: str = DATA_AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """Per-device SGD step on this device's shard; returns per-example losses and dynamics.

  `batch['weight']` is the per-example loss weight, already 0 for padding. The loss is the
  weighted mean over the global batch, so the parameter gradient, summed over the data axis
  by shard_map's transpose of the replicated parameters, is the global-batch gradient.
  `objective(logits_BxK, labels_B)` gives the per-example loss that is trained on.
  """

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits_BxK, updates = model.apply(
      variables, batch['image'], train=True, mutable=['batch_stats']
    )
    loss_B = objective(logits_BxK, batch['label'])
    return losses.weighted_mean(loss_B, batch['weight'], axis_name), (loss_B, logits_BxK, updates)

  grads, (loss_B, logits_BxK, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  state = apply_gradients(state, grads, updates, optimizer)
  return state, {'loss': loss_B, **dynamics.per_example(logits_BxK, batch['label'])}


def make_step(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  objective: Objective = losses.cross_entropy,
) -> StepFn:
  """The plain weighted-loss step as a StepFn (it does not depend on the epoch)."""

  def step(state, batch, epoch):
    del epoch
    return train_step(state, batch, model=model, optimizer=optimizer, objective=objective)

  return step


def epoch_order(key: jax.Array, num_examples: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """A shuffled pass over all examples as (steps, batch) indices and a mask of real entries.

  The last batch is padded with repeats of already-seen examples whose mask is False, so
  every example is counted exactly once per epoch and nothing is dropped.
  """
  steps = math.ceil(num_examples / batch_size)
  permutation = jax.random.permutation(key, num_examples)
  position = jnp.arange(steps * batch_size)
  index = permutation[position % num_examples]
  mask = position < num_examples
  return index.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def device_slice(x_B: jax.Array, local_batch: int) -> jax.Array:
  """This device's contiguous share of a global-batch vector."""
  start = jax.lax.axis_index(DATA_AXIS) * local_batch
  return jax.lax.dynamic_slice_in_dim(x_B, start, local_batch)


def _initial_stats() -> dict[str, jax.Array]:
  return {
    'loss_sum': jnp.zeros((), jnp.float32),
    'correct': jnp.zeros((), jnp.int32),
    'first_nonfinite_step': jnp.array(-1, jnp.int32),
  }


def _epoch_keys(key: jax.Array, epoch: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(order, augmentation, weight) keys of an epoch: the same on every path and device."""
  order_key, augment_key, weight_key = jax.random.split(jax.random.fold_in(key, epoch), 3)
  return order_key, augment_key, weight_key


def _step_and_scatter(
  carry,
  images_b,
  index_B,
  mask_B,
  step,
  augment_key,
  data,
  epoch,
  *,
  step_fn,
  batch_size,
  augment_images,
):
  """Per-device code of one step, shared by the device-resident and the streamed epochs.

  Augments this device's images with per-example keys of their global batch position,
  trains, gathers the global batch's per-example losses (and other dynamics) and scatters
  them by index into the epoch's (N, Q) values.
  """
  state, epoch_NxQ, stats = carry
  local_batch = images_b.shape[0]
  index_b, mask_b = device_slice(index_B, local_batch), device_slice(mask_B, local_batch)
  if augment_images:
    keys_B = jax.random.split(jax.random.fold_in(augment_key, step), batch_size)
    images_b = augment.augment_batch(images_b, device_slice(keys_B, local_batch))
  batch = {
    'image': images_b,
    'label': data['label'][index_b],
    'weight': jnp.where(mask_b, data['weight'][index_b], 0.0),
  }
  state, metrics = step_fn(state, batch, epoch)
  values_bxP = jnp.stack([metrics[n].astype(jnp.float32) for n in dynamics.PER_EXAMPLE], -1)
  values_BxP = jax.lax.all_gather(values_bxP, DATA_AXIS, tiled=True, to='invarying')
  loss_B, correct_B = values_BxP[:, 0], values_BxP[:, 1] > 0
  tracked_BxQ = values_BxP[:, : epoch_NxQ.shape[1]]
  epoch_NxQ = aul.scatter_losses(epoch_NxQ, index_B, tracked_BxQ, mask_B)
  finite = jnp.all(jnp.isfinite(jnp.where(mask_B, loss_B, 0.0)))
  stats = {
    'loss_sum': stats['loss_sum'] + jnp.sum(jnp.where(mask_B, loss_B, 0.0)),
    'correct': stats['correct'] + jnp.sum(mask_B & correct_B),
    'first_nonfinite_step': jnp.where(
      (stats['first_nonfinite_step'] < 0) & ~finite, step, stats['first_nonfinite_step']
    ),
  }
  return state, epoch_NxQ, stats


def _finish_epoch(aul_state, epoch_NxQ, stats, data, epoch):
  """Folds the epoch into the AUL state; with the truth known, adds the AUL's AUROC."""
  aul_state = aul.add_epoch(aul_state, epoch_NxQ, epoch)
  if 'is_mislabeled' in data:
    stats = {**stats, 'aul_auroc': metrics.auroc_on_device(aul_state.aul_N, data['is_mislabeled'])}
  return aul_state, stats


def make_train_epoch(
  step_fn: StepFn,
  mesh: jax.sharding.Mesh,
  *,
  num_examples: int,
  batch_size: int,
  augment_images: bool,
  draw_weights: Callable[[jax.Array, int], jax.Array] | None = None,
) -> Callable:
  """Compiles `run_epoch(state, aul_state, data, key, epoch) -> (state, aul_state, stats)`.

  `data` holds replicated device arrays 'image' (N,H,W,C), 'label' (N,) and 'weight' (N,),
  and optionally the truth 'is_mislabeled' (N,), which adds the AUL's AUROC to the stats.
  The whole epoch is one `lax.scan`. The per-example losses (and, if `aul_state` tracks
  them, the other dynamics) of each step are gathered over devices and scattered by index
  into the epoch's (N, Q) values, which are folded into the donated AUL state. With
  `draw_weights`, `draw_weights(key, N)` replaces data['weight'] with fresh weights at
  every epoch.
  """
  local_batch = batch_size // mesh.shape[DATA_AXIS]
  one_step = functools.partial(
    _step_and_scatter, step_fn=step_fn, batch_size=batch_size, augment_images=augment_images
  )

  def per_device_epoch(state, data, key, epoch, *, tracked):
    order_key, augment_key, weight_key = _epoch_keys(key, epoch)
    if draw_weights is not None:
      data = {**data, 'weight': draw_weights(weight_key, num_examples)}
    index_SxB, mask_SxB = epoch_order(order_key, num_examples, batch_size)

    def body(carry, step_inputs):
      step, index_B, mask_B = step_inputs
      images_b = data['image'][device_slice(index_B, local_batch)]
      return one_step(carry, images_b, index_B, mask_B, step, augment_key, data, epoch), None

    carry = (state, aul.init_epoch_values(num_examples, tracked), _initial_stats())
    steps = jnp.arange(index_SxB.shape[0])
    (state, epoch_NxQ, stats), _ = jax.lax.scan(body, carry, (steps, index_SxB, mask_SxB))
    return state, epoch_NxQ, stats

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_epoch(state, aul_state, data, key, epoch):
    epoch = jnp.asarray(epoch, jnp.int32)
    sharded_epoch = jax.shard_map(
      functools.partial(per_device_epoch, tracked=aul.tracked(aul_state)),
      mesh=mesh,
      in_specs=(P(), P(), P(), P()),
      out_specs=(P(), P(), P()),
    )
    state, epoch_NxQ, stats = sharded_epoch(state, data, key, epoch)
    aul_state, stats = _finish_epoch(aul_state, epoch_NxQ, stats, data, epoch)
    return state, aul_state, stats

  return run_epoch


def make_streamed_train_epoch(
  step_fn: StepFn,
  mesh: jax.sharding.Mesh,
  load_images: Callable[[np.ndarray], np.ndarray],
  *,
  num_examples: int,
  batch_size: int,
  augment_images: bool,
  draw_weights: Callable[[jax.Array, int], jax.Array] | None = None,
) -> Callable:
  """Like make_train_epoch, for images that stay on the host: one dispatch per step.

  `load_images(indices)` returns the (n, H, W, C) images of those example indices. Each
  process loads only the rows of its own devices' slice of every batch, one step ahead
  of the device. The same per-device step code, epoch order, keys and example indices as
  the device-resident path give the same AUL. `data` holds 'label', 'weight' (and
  optionally 'is_mislabeled') on the device; it has no 'image'.
  """
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  one_step = functools.partial(
    _step_and_scatter, step_fn=step_fn, batch_size=batch_size, augment_images=augment_images
  )
  sharded_step = jax.shard_map(
    lambda carry, images_b, *rest: one_step(carry, images_b, *rest),
    mesh=mesh,
    in_specs=(P(), P(DATA_AXIS), P(), P(), P(), P(), P(), P()),
    out_specs=P(),
  )
  compiled_step = jax.jit(sharded_step, donate_argnums=(0,))

  @functools.partial(jax.jit, static_argnums=(3,))
  def start_epoch(data, key, epoch, tracked):
    order_key, augment_key, weight_key = _epoch_keys(key, epoch)
    if draw_weights is not None:
      data = {**data, 'weight': draw_weights(weight_key, num_examples)}
    index_SxB, mask_SxB = epoch_order(order_key, num_examples, batch_size)
    zeros = aul.init_epoch_values(num_examples, tracked)
    return data, index_SxB, mask_SxB, augment_key, zeros, _initial_stats()

  finish = jax.jit(_finish_epoch, donate_argnums=(0,))

  def device_batch(index_B: np.ndarray) -> jax.Array:
    """The images of a global batch as a data-sharded array; each process loads its rows."""
    example = load_images(index_B[:1])
    shape = (len(index_B), *example.shape[1:])
    return jax.make_array_from_callback(
      shape, batch_sharding, lambda where: load_images(index_B[where[0]]).astype(np.float32)
    )

  def run_epoch(state, aul_state, data, key, epoch):
    epoch = jnp.asarray(epoch, jnp.int32)
    data, index_SxB, mask_SxB, augment_key, epoch_NxQ, stats = start_epoch(
      data, key, epoch, aul.tracked(aul_state)
    )
    index_host = to_host(index_SxB)
    carry = (state, epoch_NxQ, stats)
    with concurrent.futures.ThreadPoolExecutor(1) as loader:
      next_images = loader.submit(device_batch, index_host[0])
      for step in range(len(index_host)):
        images = next_images.result()
        if step + 1 < len(index_host):
          next_images = loader.submit(device_batch, index_host[step + 1])
        carry = compiled_step(
          carry,
          images,
          index_SxB[step],
          mask_SxB[step],
          jnp.int32(step),
          augment_key,
          data,
          epoch,
        )
    state, epoch_NxQ, stats = carry
    aul_state, stats = finish(aul_state, epoch_NxQ, stats, data, epoch)
    return state, aul_state, stats

  return run_epoch


def _eval_logits(model, variables, images, position_B, local_batch: int, num_examples: int):
  """Eval-mode logits of this device's share of a batch of example positions; positions
  past the end repeat the last example. Returns (logits_bxK, index_b, real_b)."""
  position_b = device_slice(position_B, local_batch)
  index_b = jnp.minimum(position_b, num_examples - 1)
  logits_bxK = model.apply(variables, images[index_b], train=False)
  return logits_bxK, index_b, position_b < num_examples


def make_evaluate(
  model: nn.Module, mesh: jax.sharding.Mesh, *, num_examples: int, batch_size: int
) -> Callable:
  """Compiles `evaluate(state, images, labels) -> number of correct predictions` (eval mode)."""
  local_batch = batch_size // mesh.shape[DATA_AXIS]
  steps = math.ceil(num_examples / batch_size)

  def per_device_eval(state, images, labels):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}

    def body(correct, position_B):
      logits, index_b, real_b = _eval_logits(
        model, variables, images, position_B, local_batch, num_examples
      )
      hit = (jnp.argmax(logits, -1) == labels[index_b]) & real_b
      return correct + jax.lax.psum(jnp.sum(hit), DATA_AXIS), None

    positions = jnp.arange(steps * batch_size).reshape(steps, batch_size)
    correct, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), positions)
    return correct

  return jax.jit(jax.shard_map(per_device_eval, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P()))


def make_predict(
  model: nn.Module, mesh: jax.sharding.Mesh, *, num_examples: int, batch_size: int
) -> Callable:
  """Compiles `predict(state, images) -> (N, K) float32 softmax probabilities` (eval mode).

  Used for held-out (cross-validated) probabilities, e.g. for confident learning.
  """
  local_batch = batch_size // mesh.shape[DATA_AXIS]
  steps = math.ceil(num_examples / batch_size)

  def per_device_predict(state, images):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}

    def body(_, position_B):
      logits_bxK, _, _ = _eval_logits(
        model, variables, images, position_B, local_batch, num_examples
      )
      probs_bxK = jax.nn.softmax(logits_bxK.astype(jnp.float32))
      return None, jax.lax.all_gather(probs_bxK, DATA_AXIS, tiled=True, to='invarying')

    positions = jnp.arange(steps * batch_size).reshape(steps, batch_size)
    _, probs_SxBxK = jax.lax.scan(body, None, positions)
    return probs_SxBxK.reshape(steps * batch_size, -1)[:num_examples]

  return jax.jit(jax.shard_map(per_device_predict, mesh=mesh, in_specs=(P(), P()), out_specs=P()))


def to_host(tree: Any) -> Any:
  """Copies a pytree of device arrays to numpy (the only place training data leave the device)."""
  return jax.tree.map(np.asarray, tree)


def _epoch_metrics(epoch: int, stats: dict, num_examples: int, started: float) -> dict:
  """Host copies of an epoch's metrics; raises DivergedError on a non-finite loss.

  Throughput is measured from the epoch's dispatch to the arrival of its metrics.
  """
  stats = to_host(stats)
  seconds = time.perf_counter() - started
  if stats['first_nonfinite_step'] >= 0:
    raise DivergedError(
      f'non-finite training loss at epoch {epoch + 1}, step {int(stats["first_nonfinite_step"])}'
      ' (0-based within the epoch); lower the learning rate or check the inputs'
    )
  metrics = {
    'loss': float(stats['loss_sum']) / num_examples,
    'accuracy': float(stats['correct']) / num_examples,
    'images_per_s': num_examples / max(seconds, 1e-9),
  }
  if 'aul_auroc' in stats:
    metrics['aul_auroc'] = float(stats['aul_auroc'])
  return metrics


def train_epochs(
  run_epoch: Callable,
  state: TrainState,
  aul_state: aul.AULState,
  data: dict[str, jax.Array],
  key: jax.Array,
  *,
  num_epochs: int,
  num_examples: int,
  on_epoch: Callable[[int, dict[str, float]], None],
  start_epoch: int = 0,
  checkpoint: checkpointing.Stage | None = None,
) -> tuple[TrainState, aul.AULState]:
  """Runs epochs start_epoch..num_epochs-1 and reports each as on_epoch(epoch, metrics).

  Metrics are read one epoch late so the device never idles. After e epochs, if
  `checkpoint.due(e)`, the epoch's metrics are checked first (so a diverged state is never
  saved) and the stage is saved. Raises DivergedError naming the epoch and step of the first
  non-finite loss.
  """

  arrived = [0.0]  # When the previous epoch's metrics arrived.

  def report(pending):
    # Epoch e+1 is dispatched before e's metrics are read, so on an asynchronous device it
    # was dispatched while e-1 still ran: its time starts when e-1's metrics arrived.
    epoch, stats, started = pending
    on_epoch(epoch, _epoch_metrics(epoch, stats, num_examples, max(started, arrived[0])))
    arrived[0] = time.perf_counter()

  pending = None
  for epoch in range(start_epoch, num_epochs):
    started = time.perf_counter()
    state, aul_state, stats = run_epoch(state, aul_state, data, key, epoch)
    if pending is not None:
      report(pending)
    pending = (epoch, stats, started)
    if checkpoint is not None and checkpoint.due(epoch + 1):
      report(pending)
      pending = None
      checkpoint.save(epoch + 1, state, aul_state)
  if pending is not None:
    jax.block_until_ready(aul_state)
    report(pending)
  return state, aul_state
