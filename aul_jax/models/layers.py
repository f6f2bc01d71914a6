"""Layer settings shared by the zoo's convolutional networks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aul_jax.models import conv as conv_lib
from aul_jax.models import onednn

ONEDNN_CONV_GENERAL_DILATED = conv_lib.as_conv_general_dilated(onednn.conv, onednn.DTYPES)
# Where the CPU has no bfloat16 convolution: bfloat16 falls back to lax.
ONEDNN_FLOAT32_CONV_GENERAL_DILATED = conv_lib.as_conv_general_dilated(
  onednn.conv, onednn.DTYPES[:1]
)

# He initialisation with fan_out, untruncated: torchvision's ResNet initialisation.
he_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def fast_conv_general_dilated():
  """The convolution for nn.Conv, by backend.

  On a CPU: oneDNN's (models/onednn.py) where it builds (bfloat16 only where the CPU has
  it), else XLA's with canonical-layout gradients (models/conv.py). Elsewhere lax's own,
  whose gradients are not known to be slow.
  """
  if jax.default_backend() != 'cpu':
    return None
  if onednn.unavailable_reason() is None:
    if jnp.dtype(jnp.bfloat16) in onednn.supported_dtypes():
      return ONEDNN_CONV_GENERAL_DILATED
    return ONEDNN_FLOAT32_CONV_GENERAL_DILATED
  return conv_lib.canonical_conv_general_dilated


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
