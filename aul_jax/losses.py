"""Per-example losses and the one place where they are averaged."""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy, computed in float32 whatever the logits' dtype."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxK.astype(jnp.float32), labels_B)


def weighted_mean(
  loss_B: jax.Array, weights_B: jax.Array, axis_name: str | None = None
) -> jax.Array:
  """sum_i w_i L_i / sum_i w_i over the whole (possibly device-split) batch; 0 when all w_i = 0.

  With `axis_name`, both sums run over every device's shard, so the gradient of this
  value summed over devices equals the gradient of the global-batch loss.
  """
  weight_sum = jnp.sum(weights_B)
  if axis_name is not None:
    weight_sum = jax.lax.psum(weight_sum, axis_name)
  # The guard keeps an all-zero-weight batch from producing 0/0: it then contributes nothing.
  return jnp.sum(weights_B * loss_B) / jnp.maximum(weight_sum, jnp.finfo(jnp.float32).tiny)


def hard_bootstrap(beta: float):
  """Reed et al. (2014) hard bootstrapping: target beta * given + (1 - beta) * predicted class.

  Returns an objective(logits_BxK, labels_B) -> loss_B. The predicted class is not
  differentiated through, as in the original.
  """

  def objective(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
    log_p_BxK = jax.nn.log_softmax(logits_BxK.astype(jnp.float32))
    predicted_B = jax.lax.stop_gradient(jnp.argmax(logits_BxK, axis=-1))
    given = jnp.take_along_axis(log_p_BxK, labels_B[:, None], axis=-1)[:, 0]
    guessed = jnp.take_along_axis(log_p_BxK, predicted_B[:, None], axis=-1)[:, 0]
    return -(beta * given + (1.0 - beta) * guessed)

  return objective
