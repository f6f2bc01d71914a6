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
