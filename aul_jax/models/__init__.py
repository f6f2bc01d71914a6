"""Model zoo: a plain dict from name to constructor, and `get_model` to build one by name."""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aul_jax.errors import UserInputError
from aul_jax.models.densenet import densenet121, densenet_bc
from aul_jax.models.lenet import LeNet
from aul_jax.models.mlp import MLP
from aul_jax.models.resnet import resnet, resnet50

MODELS: dict[str, Callable[..., nn.Module]] = {
  'mlp': MLP,
  'lenet': LeNet,
  'resnet20': functools.partial(resnet, depth=20),
  'resnet32': functools.partial(resnet, depth=32),
  'resnet44': functools.partial(resnet, depth=44),
  'resnet56': functools.partial(resnet, depth=56),
  'resnet110': functools.partial(resnet, depth=110),
  'resnet50': resnet50,
  'densenet_bc': densenet_bc,
  'densenet_bc_small': functools.partial(densenet_bc, depth=40, growth_rate=12),
  'densenet121': densenet121,
}


def get_model(
  name: str,
  num_classes: int,
  *,
  bn_axis_name: str | None = None,
  dtype: Dtype = jnp.float32,
  **kwargs: Any,
) -> nn.Module:
  """Builds model `name`; bn_axis_name syncs BatchNorm statistics over that mesh axis.

  Args:
    name: a key of MODELS.
    num_classes: width of the logits.
    bn_axis_name: mesh axis to average BatchNorm batch statistics over (e.g. 'data' under
      `jax.shard_map`); None for single-device statistics. Ignored by mlp and lenet.
    dtype: compute dtype; parameters stay float32 and logits are returned as float32.
    **kwargs: further constructor arguments, e.g. depth=40, growth_rate=12 for densenet_bc.

  Returns:
    A Flax module called as `model.apply(variables, x_BxHxWxC, train=...)`.
  """
  if name not in MODELS:
    raise UserInputError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}")
  if num_classes < 1:
    raise UserInputError(f'num_classes must be >= 1, got {num_classes}')
  return MODELS[name](num_classes=num_classes, bn_axis_name=bn_axis_name, dtype=dtype, **kwargs)


def check_images(name: str, image_shape: tuple[int, ...], num_classes: int) -> None:
  """Raises UserInputError unless model `name` takes (H, W, C) images of `image_shape`.

  Traces the model's initialisation on abstract values (no parameters are made), so a
  model that cannot take the data fails before training, not after.
  """
  model = get_model(name, num_classes)
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  try:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  except Exception as error:  # noqa: BLE001 - a flax or lax shape error of any kind.
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserInputError(
      f"model '{name}' cannot take images of shape {tuple(image_shape)} ({message}); pick a "
      'model for this image size (mlp takes any size)'
    ) from None


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of trainable parameters: the 'params' collection only, not 'batch_stats'."""
  return sum(int(leaf.size) for leaf in jax.tree.leaves(variables['params']))
