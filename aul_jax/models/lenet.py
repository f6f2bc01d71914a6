"""LeNet-5 with 'SAME' convolutions, so that 8x8 digits still leave a 2x2 map to classify."""

import functools

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype

from aul_jax.models import layers


class LeNet(nn.Module):
  """conv6-pool-conv16-pool-dense120-dense84-dense K, ReLU throughout, no BatchNorm."""

  num_classes: int
  bn_axis_name: str | None = None  # Unused (no BatchNorm); kept so get_model has one signature.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    del train  # No dropout or BatchNorm.
    conv = functools.partial(
      nn.Conv,
      padding='SAME',
      kernel_init=layers.he_conv_init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      conv_general_dilated=layers.fast_conv_general_dilated(),
    )
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    x = jnp.asarray(x, self.dtype)
    for features in (6, 16):
      x = nn.relu(conv(features, (5, 5))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(dense(120)(x))
    x = nn.relu(dense(84)(x))
    return dense(self.num_classes)(x).astype(jnp.float32)
