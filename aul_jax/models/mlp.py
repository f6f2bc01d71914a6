"""Multi-layer perceptron on flattened images: the cheapest baseline in the zoo."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype


class MLP(nn.Module):
  """Flatten, ReLU hidden layers, linear head; float32 logits whatever the compute dtype."""

  num_classes: int
  hidden_sizes: Sequence[int] = (512, 512)
  bn_axis_name: str | None = None  # Unused (no BatchNorm); kept so get_model has one signature.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    del train  # No dropout or BatchNorm.
    x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
    for size in self.hidden_sizes:
      x = nn.relu(nn.Dense(size, dtype=self.dtype, param_dtype=jnp.float32)(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x.astype(jnp.float32)
