"""Layer settings shared by the zoo's convolutional networks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aul_jax.models import conv as conv_lib

# He initialisation with fan_out, untruncated: torchvision's ResNet initialisation.
he_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def fast_conv_general_dilated():
  """The convolution for nn.Conv: canonical gradient convolutions on a CPU (models/conv.py),
  lax's own elsewhere, where its gradients are not known to be slow."""
  return conv_lib.canonical_conv_general_dilated if jax.default_backend() == 'cpu' else None


def conv(dtype: Dtype):
  """Bias-free He-initialised convolutions computing in `dtype` with float32 parameters."""
  return functools.partial(
    nn.Conv,
    use_bias=False,
    kernel_init=he_conv_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    conv_general_dilated=fast_conv_general_dilated(),
  )


def batch_norm(train: bool, axis_name: str | None, dtype: Dtype):
  """PyTorch-equivalent BatchNorm (momentum 0.1, eps 1e-5), synchronised over `axis_name`."""
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    axis_name=axis_name,
    dtype=dtype,
    param_dtype=jnp.float32,
  )
