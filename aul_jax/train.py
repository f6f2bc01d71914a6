"""Data-parallel training: a per-device train step under `jax.shard_map`, one compiled epoch.

The per-device programming model is pmap's (collectives over a 'data' axis), written with
`jax.shard_map` under `jax.jit` on a 1-D mesh. Training data live on the device; an epoch
(shuffle, augmentation, every step, the AUL scatter) is one `lax.scan`, one host dispatch.

Trials: R networks can train in lockstep in the same program (`trials=R`). Their train
states, AUL states and keys carry a leading R axis, and so may the per-example data fields
(labels, weights) that differ between them; the per-device epoch is `jax.vmap`ped over R,
so the images are on the device once and an epoch stays one dispatch. Without trials
(`trials=0`) nothing is vmapped and the arrays have no R axis.

The per-example state (the AUL state) is split over the data axis: each device owns a
contiguous range of ceil(N / devices) example rows (`init_aul_state`). Every step gathers
the global batch's per-example values, and each device folds them into its own rows only
(`aul.add_rows`), so a device holds O(N / devices) bytes of it (40 per example with the
dynamics, plus the history's) and no (N, Q) epoch buffer.
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aul_jax import augment, aul, checkpointing, config, dynamics, losses, metrics
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


def rows_per_device(num_examples: int, mesh: jax.sharding.Mesh) -> int:
  """Example rows of per-example state that each device owns: ceil(N / devices)."""
  return -(-num_examples // mesh.shape[DATA_AXIS])


def _data_spec(trials: int) -> P:
  """Split over the data axis along the examples: batches and per-example state ((N, ...),
  or (R, N, ...) with trials)."""
  return P(None, DATA_AXIS) if trials else P(DATA_AXIS)


def _aul_state_specs(aul_state: aul.AULState, trials: int) -> aul.AULState:
  """The state's layout: per-example arrays split over the data axis, per-run scalars whole."""
  lead = 2 if trials else 1
  return jax.tree.map(lambda a: _data_spec(trials) if a.ndim >= lead else P(), aul_state)


def init_aul_state(
  mesh: jax.sharding.Mesh,
  num_examples: int,
  num_epochs: int,
  history_dtype: str | None,
  *,
  dynamics: bool = True,
  trials: int = 0,
) -> aul.AULState:
  """`aul.init_aul_state`, created split over the data axis of `mesh`: padded to a whole
  number of rows per device, each device holding only its rows; per-run scalars whole."""
  rows = rows_per_device(num_examples, mesh) * mesh.shape[DATA_AXIS]
  init = functools.partial(
    aul.init_aul_state, num_examples, num_epochs, history_dtype, dynamics=dynamics,
    trials=trials, rows=rows,
  )  # fmt: skip
  specs = _aul_state_specs(jax.eval_shape(init), trials)
  return jax.jit(init, out_shardings=jax.tree.map(lambda p: NamedSharding(mesh, p), specs))()


def make_optimizer(
  *,
  learning_rate: float,
  momentum: float,
  weight_decay: float,
  steps_per_epoch: int,
  lr_drop_epochs: Sequence[int] = (),
  lr_drop_factor: float = 0.1,
  warmup_epochs: float = 0,
  clip_grad_norm: float = 0.0,
  schedule: str = 'step',
  num_epochs: int = 0,
) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (as in PyTorch), step-wise LR drops at epochs.

  `warmup_epochs` > 0 ramps the learning rate linearly up from lr / warmup steps over that
  many epochs; `clip_grad_norm` > 0 clips each step's gradient to that global norm. Both
  guard a recipe against an early blow-up on data it was not tuned on; at 0 they are off
  and the optimizer is the paper's. `schedule='cosine'` replaces the drops by a cosine decay
  to 0 over the `num_epochs` after the warm-up (the large-batch ImageNet recipes').
  """
  warmup_steps = int(round(warmup_epochs * steps_per_epoch))
  if schedule == 'cosine':
    decay = optax.cosine_decay_schedule(
      learning_rate, decay_steps=max(num_epochs * steps_per_epoch - warmup_steps, 1)
    )
    rate = lambda step: decay(jnp.maximum(step - warmup_steps, 0))  # noqa: E731
  elif schedule == 'step':
    rate = optax.piecewise_constant_schedule(
      learning_rate, {int(e) * steps_per_epoch: lr_drop_factor for e in lr_drop_epochs}
    )
  else:
    raise ValueError(f'unknown schedule {schedule!r}; known: {", ".join(config.SCHEDULES)}')
  if warmup_steps > 0:
    unwarmed = rate
    rate = lambda step: unwarmed(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)  # noqa: E731
  clip = [optax.clip_by_global_norm(clip_grad_norm)] if clip_grad_norm > 0 else []
  return optax.chain(
    *clip,
    optax.add_decayed_weights(weight_decay),
    optax.sgd(rate, momentum=momentum),
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
  trains, gathers the global batch's per-example losses (and other dynamics) and folds
  them by index into this device's rows of the AUL state.
  """
  state, aul_state, stats = carry
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
  tracked_BxQ = values_BxP[:, : aul.tracked(aul_state)]
  aul_state = aul.add_rows(aul_state, _own_rows(index_B, mask_B, aul_state), tracked_BxQ, epoch)
  finite = jnp.all(jnp.isfinite(jnp.where(mask_B, loss_B, 0.0)))
  stats = {
    'loss_sum': stats['loss_sum'] + jnp.sum(jnp.where(mask_B, loss_B, 0.0)),
    'correct': stats['correct'] + jnp.sum(mask_B & correct_B),
    'first_nonfinite_step': jnp.where(
      (stats['first_nonfinite_step'] < 0) & ~finite, step, stats['first_nonfinite_step']
    ),
  }
  return state, aul_state, stats


def _own_rows(index_B: jax.Array, mask_B: jax.Array, aul_state: aul.AULState) -> jax.Array:
  """The batch's examples as rows of this device's part of the AUL state; padding and
  other devices' examples get an out-of-range row, which `aul.add_rows` drops."""
  rows = aul_state.aul_N.shape[0]
  local_B = index_B - jax.lax.axis_index(DATA_AXIS) * rows
  return jnp.where(mask_B & (local_B >= 0) & (local_B < rows), local_B, rows)


def over_trials(fn: Callable, trials: int, in_axes: Any = 0) -> Callable:
  """`fn` vmapped over a leading trial axis when there are trials, else `fn` itself."""
  return jax.vmap(fn, in_axes=in_axes) if trials else fn


def _finish_epoch(aul_state, stats, data, epoch, *, trials: int, mesh):
  """Closes the epoch in the AUL state; with the truth known, adds the AUL's AUROC (from
  the AUL gathered whole on every device: the sort needs all of it)."""
  aul_state = over_trials(aul.end_epoch, trials, in_axes=(0, None))(aul_state, epoch)
  if 'is_mislabeled' in data:
    truth_N = data['is_mislabeled']
    aul_N = jax.sharding.reshard(aul_state.aul_N, NamedSharding(mesh, P()))[..., : len(truth_N)]
    auroc = functools.partial(metrics.auroc_on_device, truth_N=truth_N)
    stats = {**stats, 'aul_auroc': over_trials(auroc, trials)(aul_N)}
  return aul_state, stats


def _data_axes(data: dict, trial_fields: Sequence[str]) -> dict:
  """vmap's in_axes of `data`: 0 for the fields that differ between trials, None for shared."""
  return {name: 0 if name in trial_fields else None for name in data}


def make_train_epoch(
  step_fn: StepFn,
  mesh: jax.sharding.Mesh,
  *,
  num_examples: int,
  batch_size: int,
  augment_images: bool,
  draw_weights: Callable[[jax.Array, int], jax.Array] | None = None,
  trials: int = 0,
  trial_fields: Sequence[str] = (),
) -> Callable:
  """Compiles `run_epoch(state, aul_state, data, key, epoch) -> (state, aul_state, stats)`.

  `data` holds replicated device arrays 'image' (N,H,W,C), 'label' (N,) and 'weight' (N,),
  and optionally the truth 'is_mislabeled' (N,), which adds the AUL's AUROC to the stats.
  `aul_state` is split over the data axis (`init_aul_state`). The whole epoch is one
  `lax.scan`. The per-example losses (and, if `aul_state` tracks them, the other dynamics)
  of each step are gathered over devices, and each device folds them by index into its
  own rows of the donated AUL state (`aul.add_rows`). With
  `draw_weights`, `draw_weights(key, N)` replaces data['weight'] with fresh weights at
  every epoch. With `trials` = R > 0, state, aul_state, key and the `trial_fields` of
  `data` have a leading R axis (the module docstring), and so have the stats.
  """
  local_batch = batch_size // mesh.shape[DATA_AXIS]
  one_step = functools.partial(
    _step_and_scatter, step_fn=step_fn, batch_size=batch_size, augment_images=augment_images
  )

  def per_device_epoch(state, aul_state, data, key, epoch):
    order_key, augment_key, weight_key = _epoch_keys(key, epoch)
    if draw_weights is not None:
      data = {**data, 'weight': draw_weights(weight_key, num_examples)}
    index_SxB, mask_SxB = epoch_order(order_key, num_examples, batch_size)

    def body(carry, step_inputs):
      step, index_B, mask_B = step_inputs
      images_b = data['image'][device_slice(index_B, local_batch)]
      return one_step(carry, images_b, index_B, mask_B, step, augment_key, data, epoch), None

    carry = (state, aul_state, _initial_stats())
    steps = jnp.arange(index_SxB.shape[0])
    (state, aul_state, stats), _ = jax.lax.scan(body, carry, (steps, index_SxB, mask_SxB))
    return state, aul_state, stats

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_epoch(state, aul_state, data, key, epoch):
    epoch = jnp.asarray(epoch, jnp.int32)
    epoch_fn = over_trials(
      per_device_epoch, trials, in_axes=(0, 0, _data_axes(data, trial_fields), 0, None)
    )
    specs = _aul_state_specs(aul_state, trials)
    sharded_epoch = jax.shard_map(
      epoch_fn,
      mesh=mesh,
      in_specs=(P(), specs, P(), P(), P()),
      out_specs=(P(), specs, P()),
    )
    state, aul_state, stats = sharded_epoch(state, aul_state, data, key, epoch)
    aul_state, stats = _finish_epoch(aul_state, stats, data, epoch, trials=trials, mesh=mesh)
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
  trials: int = 0,
  trial_fields: Sequence[str] = (),
) -> Callable:
  """Like make_train_epoch, for images that stay on the host: one dispatch per step.

  `load_images(indices)` returns the (n, H, W, C) images of those example indices. Each
  process loads only the rows of its own devices' slice of every batch, one step ahead
  of the device. The same per-device step code, epoch order, keys and example indices as
  the device-resident path give the same AUL. `data` holds 'label', 'weight' (and
  optionally 'is_mislabeled') on the device; it has no 'image'. With trials, each step
  loads the R trials' batches, (R, B, H, W, C).
  """
  data_sharding = NamedSharding(mesh, _data_spec(trials))
  one_step = functools.partial(
    _step_and_scatter, step_fn=step_fn, batch_size=batch_size, augment_images=augment_images
  )

  @functools.partial(jax.jit, donate_argnums=(0,), static_argnames=('fields',))
  def compiled_step(carry, images, index_B, mask_B, step, augment_key, data, epoch, fields):
    step_fn = over_trials(
      one_step, trials, in_axes=(0, 0, 0, 0, None, 0, _data_axes(data, fields), None)
    )
    carry_specs = (P(), _aul_state_specs(carry[1], trials), P())
    sharded_step = jax.shard_map(
      step_fn,
      mesh=mesh,
      in_specs=(carry_specs, _data_spec(trials), P(), P(), P(), P(), P(), P()),
      out_specs=carry_specs,
    )
    return sharded_step(carry, images, index_B, mask_B, step, augment_key, data, epoch)

  def begin_epoch(key, epoch):
    order_key, augment_key, weight_key = _epoch_keys(key, epoch)
    weight_N = None if draw_weights is None else draw_weights(weight_key, num_examples)
    index_SxB, mask_SxB = epoch_order(order_key, num_examples, batch_size)
    return weight_N, index_SxB, mask_SxB, augment_key, _initial_stats()

  start_epoch = jax.jit(over_trials(begin_epoch, trials, in_axes=(0, None)))

  finish = jax.jit(functools.partial(_finish_epoch, trials=trials, mesh=mesh), donate_argnums=(0,))

  def device_batch(index: np.ndarray) -> jax.Array:
    """The images of a global batch ((B,) indices, or (R, B) with trials) as a data-sharded
    array; each process loads only its rows."""
    example = load_images(index.reshape(-1)[:1])
    shape = (*index.shape, *example.shape[1:])

    def load(where):
      rows = index[where[: index.ndim]]
      images = load_images(rows.reshape(-1)).astype(np.float32)
      return images.reshape(*rows.shape, *example.shape[1:])

    return jax.make_array_from_callback(shape, data_sharding, load)

  def run_epoch(state, aul_state, data, key, epoch):
    epoch = jnp.asarray(epoch, jnp.int32)
    weight, index, mask, augment_key, stats = start_epoch(key, epoch)
    fields = trial_fields
    if weight is not None:  # This epoch's random weights, one set per trial.
      data, fields = {**data, 'weight': weight}, (*trial_fields, 'weight')
    index_host = to_host(index)  # (S, B), or (R, S, B) with trials.
    steps = index_host.shape[-2]
    at = (lambda a, s: a[:, s]) if trials else (lambda a, s: a[s])
    carry = (state, aul_state, stats)
    with concurrent.futures.ThreadPoolExecutor(1) as loader:
      next_images = loader.submit(device_batch, at(index_host, 0))
      for step in range(steps):
        images = next_images.result()
        if step + 1 < steps:
          next_images = loader.submit(device_batch, at(index_host, step + 1))
        carry = compiled_step(
          carry,
          images,
          at(index, step),
          at(mask, step),
          jnp.int32(step),
          augment_key,
          data,
          epoch,
          fields=fields,
        )
    state, aul_state, stats = carry
    aul_state, stats = finish(aul_state, stats, data, epoch)
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
  model: nn.Module,
  mesh: jax.sharding.Mesh,
  *,
  num_examples: int,
  batch_size: int,
  trials: int = 0,
) -> Callable:
  """Compiles `evaluate(state, images, labels) -> number of correct predictions` (eval mode);
  with trials, of each trial's network, (R,)."""
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

  per_device_eval = over_trials(per_device_eval, trials, in_axes=(0, None, None))
  return jax.jit(jax.shard_map(per_device_eval, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P()))


def make_predict(
  model: nn.Module,
  mesh: jax.sharding.Mesh,
  *,
  num_examples: int,
  batch_size: int,
  trials: int = 0,
) -> Callable:
  """Compiles `predict(state, images) -> (N, K) float32 softmax probabilities` (eval mode);
  with trials, (R, N, K).

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

  per_device_predict = over_trials(per_device_predict, trials, in_axes=(0, None))
  return jax.jit(jax.shard_map(per_device_predict, mesh=mesh, in_specs=(P(), P()), out_specs=P()))


def to_host(tree: Any) -> Any:
  """Copies a pytree of device arrays to numpy (the only place training data leave the
  device), whole: an array split over several processes' devices is gathered first."""

  def fetch(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      a = multihost_utils.process_allgather(a, tiled=True)
    return np.asarray(a)

  return jax.tree.map(fetch, tree)


def host_statistics(aul_state: aul.AULState, trials: int = 0) -> dict[str, np.ndarray]:
  """`aul.statistics` as host arrays of the N examples, (N,) each ((R, N) with trials):
  computed where the state lies, gathered, the padding rows cut off."""
  statistics = over_trials(aul.statistics, trials)(aul_state)
  # A dict comprehension, not to_host: pytree maps sort the keys, and scores.csv keeps the
  # documented order of the columns.
  return {name: to_host(v)[..., : aul_state.num_examples] for name, v in statistics.items()}


def host_history(aul_state: aul.AULState) -> np.ndarray | None:
  """The (N, T) loss history of the N examples ((R, N, T) with trials) on the host, or
  None when none was kept."""
  if aul_state.history_NxT is None:
    return None
  return to_host(aul_state.history_NxT)[..., : aul_state.num_examples, :]


def _epoch_metrics(epoch: int, stats: dict, num_examples: int, started: float) -> dict:
  """Host copies of an epoch's metrics (means over trials, if any); raises DivergedError on
  a non-finite loss, naming the trial.

  Throughput is measured from the epoch's dispatch to the arrival of its metrics.
  """
  stats = to_host(stats)
  seconds = time.perf_counter() - started
  bad_step_R = np.atleast_1d(stats['first_nonfinite_step'])
  if np.any(bad_step_R >= 0):
    trial = int(np.argmax(bad_step_R >= 0))
    where = f' in trial {trial}' if np.ndim(stats['first_nonfinite_step']) else ''
    raise DivergedError(
      f'non-finite training loss{where} at epoch {epoch + 1}, step {int(bad_step_R[trial])}'
      ' (0-based within the epoch); lower the learning rate or check the inputs'
    )
  trials = max(np.size(stats['loss_sum']), 1)
  metrics = {
    'loss': float(np.sum(stats['loss_sum'])) / (trials * num_examples),
    'accuracy': float(np.sum(stats['correct'])) / (trials * num_examples),
    'images_per_s': trials * num_examples / max(seconds, 1e-9),
  }
  if 'aul_auroc' in stats:
    metrics['aul_auroc'] = float(np.mean(stats['aul_auroc']))
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
