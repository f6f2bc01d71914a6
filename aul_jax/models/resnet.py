"""CIFAR ResNets of He et al. (2016), section 4.2: depth 6n+2, stages of 16/32/64 channels.

Shortcuts are the paper's option A (parameter-free): strided subsampling plus zero-padded
channels, which is what gives ResNet-20 its 0.27M parameters.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype

from aul_jax.errors import UserInputError
from aul_jax.models import layers

ModuleDef = Any


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers plus an option-A identity shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # Symmetric padding 1 (as in PyTorch), so a strided conv samples the same pixels as the
    # x[::2, ::2] shortcut; 'SAME' would pad only after and shift them by one.
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3), padding=1)(y)
    y = self.norm()(y)
    return nn.relu(y + self._shortcut(x))

  def _shortcut(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x[:, :: self.strides, :: self.strides, :]
    extra = self.features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x


class CifarResNet(nn.Module):
  """3x3 stem, three stages of `blocks_per_stage` basic blocks, global average pool, linear."""

  num_classes: int
  blocks_per_stage: int
  widths: Sequence[int] = (16, 32, 64)
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    conv = layers.conv(self.dtype)
    norm = layers.batch_norm(train, self.bn_axis_name, self.dtype)
    x = jnp.asarray(x, self.dtype)
    x = nn.relu(norm()(conv(self.widths[0], (3, 3), padding=1)(x)))
    for stage, features in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, conv=conv, norm=norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x.astype(jnp.float32)


def resnet(depth: int, **kwargs: Any) -> CifarResNet:
  """Builds the CIFAR ResNet of the given depth; depth must be 6n+2 (20, 32, 44, 56, 110)."""
  if depth < 8 or (depth - 2) % 6:
    raise UserInputError(f'CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}')
  return CifarResNet(blocks_per_stage=(depth - 2) // 6, **kwargs)
