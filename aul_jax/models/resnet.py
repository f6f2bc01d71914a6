"""ResNets of He et al. (2016): the CIFAR ones of section 4.2 and the ImageNet ResNet-50.

CIFAR: depth 6n+2, stages of 16/32/64 channels. Shortcuts are the paper's option A
(parameter-free): strided subsampling plus zero-padded channels, which is what gives
ResNet-20 its 0.27M parameters.

ImageNet: 7x7/2 stem and 3x3/2 max pool, then bottleneck blocks (1x1, 3x3, 1x1 with 4x
expansion) in stages of 3/4/6/3, projection shortcuts, the stride in the 3x3 conv ("v1.5",
as torchvision and the flax ImageNet example). Each block's last BatchNorm starts at scale
0, so a block starts as the identity (Goyal et al., 2017), which large global batches need.
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


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN; a projection shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.relu(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=1)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(4 * self.features, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    shortcut = x
    if x.shape[-1] != 4 * self.features or self.strides != 1:
      shortcut = self.conv(4 * self.features, (1, 1), (self.strides, self.strides))(x)
      shortcut = self.norm()(shortcut)
    return nn.relu(y + shortcut)


class ImageNetResNet(nn.Module):
  """7x7/2 stem, 3x3/2 max pool, four stages of bottleneck blocks, average pool, linear."""

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    conv = layers.conv(self.dtype)
    norm = layers.batch_norm(train, self.bn_axis_name, self.dtype)
    x = conv(self.widths[0], (7, 7), (2, 2), padding=3)(jnp.asarray(x, self.dtype))
    x = nn.relu(norm()(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, features) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BottleneckBlock(features, strides, conv=conv, norm=norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x.astype(jnp.float32)


def resnet50(**kwargs: Any) -> ImageNetResNet:
  """Builds the ImageNet ResNet-50 (25.6M parameters with 1,000 classes)."""
  return ImageNetResNet(stage_sizes=(3, 4, 6, 3), **kwargs)
