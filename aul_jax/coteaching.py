"""Co-teaching (Han et al., 2018): two networks train each other on their small-loss examples.

Each network ranks the batch by its own loss and hands the (1 - forget_rate) smallest-loss
fraction to the other network. The forget rate ramps linearly from 0 to its maximum over
the first `gradual_epochs` epochs. Selection is over the global batch, so the result does
not depend on the number of devices.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aul_jax import dynamics, losses, train


def forget_rate(epoch: jax.Array, max_rate: float, gradual_epochs: int) -> jax.Array:
  """tau * min(epoch / T_k, 1), Han et al.'s schedule (0-based epoch)."""
  return max_rate * jnp.minimum(epoch / max(gradual_epochs, 1), 1.0)


def small_loss_selection(loss_b: jax.Array, real_b: jax.Array, keep_fraction: jax.Array):
  """Marks this device's examples among the round(keep_fraction * n) smallest global losses."""
  loss_B = jax.lax.all_gather(
    jnp.where(real_b, loss_b, jnp.inf), train.DATA_AXIS, tiled=True, to='invarying'
  )
  num_real = jax.lax.psum(jnp.sum(real_b), train.DATA_AXIS)
  keep = jnp.round(keep_fraction * num_real).astype(jnp.int32)
  rank_B = jnp.argsort(jnp.argsort(loss_B, stable=True), stable=True)
  return train.device_slice(rank_B < keep, loss_b.shape[0]) & real_b


def _forward(model, state, params, images):
  variables = {'params': params, 'batch_stats': state.batch_stats}
  return model.apply(variables, images, train=True, mutable=['batch_stats'])


def make_coteaching_step(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  *,
  max_forget_rate: float,
  gradual_epochs: int,
) -> train.StepFn:
  """A StepFn over a pair of TrainStates; reports network A's losses and dynamics."""

  def step(states, batch, epoch):
    state_a, state_b = states
    keep_fraction = 1.0 - forget_rate(epoch, max_forget_rate, gradual_epochs)
    real_b = batch['weight'] > 0

    def loss_fn(params_pair):
      logits_a, updates_a = _forward(model, state_a, params_pair[0], batch['image'])
      logits_b, updates_b = _forward(model, state_b, params_pair[1], batch['image'])
      loss_a = losses.cross_entropy(logits_a, batch['label'])
      loss_b = losses.cross_entropy(logits_b, batch['label'])
      # Each network learns from the examples its peer finds easy.
      keep_for_a = small_loss_selection(jax.lax.stop_gradient(loss_b), real_b, keep_fraction)
      keep_for_b = small_loss_selection(jax.lax.stop_gradient(loss_a), real_b, keep_fraction)
      weight = batch['weight']
      total = losses.weighted_mean(loss_a, weight * keep_for_a, train.DATA_AXIS)
      total += losses.weighted_mean(loss_b, weight * keep_for_b, train.DATA_AXIS)
      return total, (loss_a, logits_a, updates_a, updates_b)

    (grads_a, grads_b), (loss_a, logits_a, updates_a, updates_b) = jax.grad(loss_fn, has_aux=True)(
      (state_a.params, state_b.params)
    )
    states = (
      train.apply_gradients(state_a, grads_a, updates_a, optimizer),
      train.apply_gradients(state_b, grads_b, updates_b, optimizer),
    )
    return states, {'loss': loss_a, **dynamics.per_example(logits_a, batch['label'])}

  return step


def gradual_epochs_for(num_epochs: int, fraction: float) -> int:
  """T_k in epochs: Han et al. use 10 of 200 epochs; shorter runs scale it in proportion."""
  return max(1, math.ceil(fraction * num_epochs))
