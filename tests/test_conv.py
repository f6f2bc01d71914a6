"""The zoo's fallback convolution (models/conv.py), which runs where oneDNN does not, under vmap:
R trials in lockstep get each trial's lax values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from aul_jax.models import conv as conv_lib

NHWC = conv_lib.NHWC


def _value_and_grads(conv, x, w, dy, strides, padding):
  y, vjp = jax.vjp(lambda x, w: conv(x, w, strides, padding, dimension_numbers=NHWC), x, w)
  return (y, *vjp(dy))


@pytest.mark.parametrize('in_axes', [(0, 0), (None, 0), (0, None)])
def test_vmapped_canonical_convolution_matches_lax_per_trial(in_axes):
  strides, padding = (2, 2), ((1, 0), (0, 2))
  kx, kw, ky = jax.random.split(jax.random.key(0), 3)
  x_RxNxHxWxC = jax.random.normal(kx, (3, 4, 9, 8, 5))
  w_RxKxKxCxO = jax.random.normal(kw, (3, 3, 3, 5, 6))
  dy_RxNxHoxWoxO = jax.random.normal(ky, (3, 4, 4, 4, 6))
  x = x_RxNxHxWxC if in_axes[0] == 0 else x_RxNxHxWxC[0]
  w = w_RxKxKxCxO if in_axes[1] == 0 else w_RxKxKxCxO[0]
  per_trial = lambda conv: lambda x, w, dy: _value_and_grads(conv, x, w, dy, strides, padding)
  vmapped = jax.vmap(per_trial(conv_lib.canonical_conv_general_dilated), (*in_axes, 0))
  got = jax.jit(vmapped)(x, w, dy_RxNxHoxWoxO)
  reference = per_trial(functools.partial(lax.conv_general_dilated, precision='highest'))
  trials = [
    reference(x if in_axes[0] is None else x[r], w if in_axes[1] is None else w[r], dy)
    for r, dy in enumerate(dy_RxNxHoxWoxO)
  ]
  want = [jnp.stack(t) for t in zip(*trials, strict=True)]
  for g, r in zip(got, want, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
