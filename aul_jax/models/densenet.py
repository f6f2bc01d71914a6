"""DenseNets of Huang et al. (2017): DenseNet-BC for CIFAR and the ImageNet DenseNet-121."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype

from aul_jax.errors import UserInputError
from aul_jax.models import layers

ModuleDef = Any


def _avg_pool2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2/2 average pool that never shrinks a map to zero (a 1x1 map stays 1x1)."""
  # Identical to 'VALID' on even sizes; 'SAME' keeps tiny inputs (8x8 digits) alive.
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)


class DenseLayer(nn.Module):
  """Bottleneck layer BN-ReLU-conv1x1(bn_size*k)-BN-ReLU-conv3x3(k), concatenated to its input."""

  growth_rate: int
  bn_size: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = self.conv(self.bn_size * self.growth_rate, (1, 1))(nn.relu(self.norm()(x)))
    y = self.conv(self.growth_rate, (3, 3), padding=1)(nn.relu(self.norm()(y)))
    return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
  """BN-ReLU-conv1x1 that compresses channels, then a 2x2 average pool."""

  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return _avg_pool2(self.conv(self.features, (1, 1))(nn.relu(self.norm()(x))))


class DenseNet(nn.Module):
  """Stem, dense blocks joined by transitions, BN-ReLU, global average pool, linear head."""

  num_classes: int
  block_sizes: Sequence[int]
  growth_rate: int
  num_init_features: int
  imagenet_stem: bool = False  # 7x7/2 conv + 3x3/2 max pool, else a single 3x3 conv.
  bn_size: int = 4
  compression: float = 0.5
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    conv = layers.conv(self.dtype)
    norm = layers.batch_norm(train, self.bn_axis_name, self.dtype)
    x = self._stem(jnp.asarray(x, self.dtype), conv, norm)
    for i, num_layers in enumerate(self.block_sizes):
      for _ in range(num_layers):
        x = DenseLayer(self.growth_rate, self.bn_size, conv=conv, norm=norm)(x)
      if i < len(self.block_sizes) - 1:
        x = Transition(int(x.shape[-1] * self.compression), conv=conv, norm=norm)(x)
    x = jnp.mean(nn.relu(norm()(x)), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x.astype(jnp.float32)

  def _stem(self, x: jnp.ndarray, conv: ModuleDef, norm: ModuleDef) -> jnp.ndarray:
    if not self.imagenet_stem:
      return conv(self.num_init_features, (3, 3), padding=1)(x)
    x = conv(self.num_init_features, (7, 7), (2, 2), padding=3)(x)
    x = nn.relu(norm()(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def densenet_bc(*, depth: int = 100, growth_rate: int = 12, **kwargs: Any) -> DenseNet:
  """Builds the CIFAR DenseNet-BC: three blocks of (depth-4)/6 bottleneck layers, 2k stem."""
  if depth < 10 or (depth - 4) % 6:
    raise UserInputError(f'DenseNet-BC depth must be 6n+4 with n >= 1, got {depth}')
  num_layers = (depth - 4) // 6
  return DenseNet(
    block_sizes=(num_layers,) * 3,
    growth_rate=growth_rate,
    num_init_features=2 * growth_rate,
    **kwargs,
  )


def densenet121(**kwargs: Any) -> DenseNet:
  """Builds the ImageNet DenseNet-121: blocks 6/12/24/16, growth 32, 64-channel 7x7 stem."""
  return DenseNet(
    block_sizes=(6, 12, 24, 16), growth_rate=32, num_init_features=64, imagenet_stem=True, **kwargs
  )
