"""Convolutions whose gradients XLA:CPU runs on its fast path, also inside `lax.scan`.

Inside a while loop (our whole-epoch scan) XLA:CPU leaves the convolutions that JAX's
transpose rules produce in non-canonical layouts and runs them on a generic path about
100x slower (docs/benchmarks.md, section 2). A custom VJP writes both gradients as
canonical NHWC/HWIO convolutions instead: the ResNet-20 epoch runs 36x faster on a CPU
with the same results (gradients equal to lax's to float32 rounding).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ('NHWC', 'HWIO', 'NHWC')


def explicit_pads(x_shape, w_shape, strides, padding) -> tuple[tuple[int, int], ...]:
  """Padding as explicit (low, high) pairs of the two spatial dimensions."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def input_grad_canonical(dy_NxHoxWoxO, w_KxKxCxO, x_shape, strides, pads) -> jax.Array:
  """dx as one convolution of dy (dilated by the stride) with the flipped kernel, in HWIO.

  lax's own transpose gives the same convolution with the kernel as 01oi, which XLA:CPU does
  not canonicalise inside a loop; with the (tiny) kernel transposed explicitly it is HWIO.
  """
  w_KxKxOxC = jnp.transpose(jnp.flip(w_KxKxCxO, (0, 1)), (0, 1, 3, 2))
  dx_pads = []
  for d in range(2):
    k, lo = w_KxKxCxO.shape[d], pads[d][0]
    before = k - 1 - lo
    after = x_shape[1 + d] + k - 1 - ((dy_NxHoxWoxO.shape[1 + d] - 1) * strides[d] + 1) - before
    dx_pads.append((before, after))
  return lax.conv_general_dilated(
    dy_NxHoxWoxO, w_KxKxOxC, (1, 1), dx_pads, lhs_dilation=strides, dimension_numbers=NHWC
  )


def weight_grad_canonical(x_NxHxWxC, dy_NxHoxWoxO, w_shape, strides, pads) -> jax.Array:
  """dW as one convolution over the batch, with operands transposed to canonical b01f/01io.

  dW[i, j, c, o] = sum_{n,h,w} x_pad[n, s*h + i, s*w + j, c] * dy[n, h, w, o]: the input, with
  C as its batch and N as its feature dimension, convolved with dy dilated by the stride.
  """
  lhs_CxHxWxN = jnp.transpose(x_NxHxWxC, (3, 1, 2, 0))
  rhs_HoxWoxNxO = jnp.transpose(dy_NxHoxWoxO, (1, 2, 0, 3))
  grad_pads = []
  for d in range(2):
    lo = pads[d][0]
    # Chosen so that the output's spatial size is exactly the kernel's.
    hi = w_shape[d] + (dy_NxHoxWoxO.shape[1 + d] - 1) * strides[d] - x_NxHxWxC.shape[1 + d] - lo
    grad_pads.append((lo, hi))
  dw_CxKxKxO = lax.conv_general_dilated(
    lhs_CxHxWxN, rhs_HoxWoxNxO, (1, 1), grad_pads, rhs_dilation=strides, dimension_numbers=NHWC
  )
  return jnp.transpose(dw_CxKxKxO, (1, 2, 0, 3))


def make_canonical_conv(weight_grad: Callable) -> Callable:
  """conv(x, w, strides, pads): lax's forward convolution with canonical-layout gradients.

  The input gradient is `input_grad_canonical`; the weight gradient is
  `weight_grad(x, dy, w_shape, strides, pads)`.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def conv(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC)

  def conv_fwd(x, w, strides, pads):
    return conv(x, w, strides, pads), (x, w)

  def conv_bwd(strides, pads, residuals, dy):
    x, w = residuals
    dx = input_grad_canonical(dy, w, x.shape, strides, pads)
    return dx.astype(x.dtype), weight_grad(x, dy, w.shape, strides, pads).astype(w.dtype)

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


def as_conv_general_dilated(conv: Callable, dtypes: tuple | None = None) -> Callable:
  """A lax.conv_general_dilated that runs `conv(x, w, strides, pads)` in the plain case.

  Plain: NHWC/HWIO, undilated, ungrouped, both operands of one dtype (one of `dtypes`, when
  given). Every other case falls back to lax.
  """

  def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ):
    plain = (
      lhs.ndim == 4
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
      and all(d == 1 for d in (lhs_dilation or (1,)) + (rhs_dilation or (1,)))
      and feature_group_count == 1
      and batch_group_count == 1
      and preferred_element_type is None
      and lhs.dtype == rhs.dtype
      and (dtypes is None or lhs.dtype in dtypes)
    )
    if not plain:
      return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
      )
    strides = tuple(int(s) for s in window_strides)
    lhs, rhs = _same_varying_axes(lhs, rhs)
    return conv(lhs, rhs, strides, explicit_pads(lhs.shape, rhs.shape, strides, padding))

  return conv_general_dilated


def make_conv_general_dilated(weight_grad: Callable) -> Callable:
  """A lax.conv_general_dilated whose plain case has canonical-layout gradients."""
  return as_conv_general_dilated(make_canonical_conv(weight_grad))


def varying_axes(x: jax.Array) -> tuple:
  """The mesh axes `x` varies over under shard_map (empty outside it)."""
  mat = getattr(jax.typeof(x), 'mat', None)
  return tuple(getattr(mat, 'varying', ()))


def _same_varying_axes(*xs: jax.Array) -> list[jax.Array]:
  """Under shard_map, marks each operand varying over every axis any operand varies over.

  A custom VJP's weight gradient must have its weight's type; as for lax's own convolution,
  the transpose of this cast is the psum of the per-device weight gradients.
  """
  axes = {a for x in xs for a in varying_axes(x)}
  out = []
  for x in xs:
    missing = tuple(sorted(axes - set(varying_axes(x))))
    out.append(lax.pcast(x, missing, to='varying') if missing else x)
  return out


# lax.conv_general_dilated with canonical gradient convolutions; flax's nn.Conv takes it
# as `conv_general_dilated=`.
canonical_conv_general_dilated = make_conv_general_dilated(weight_grad_canonical)
