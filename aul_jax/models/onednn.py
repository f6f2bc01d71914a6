"""2-D convolutions on the CPU through oneDNN, called from XLA as FFI custom calls.

XLA:CPU runs the backward pass of small CNNs 2-3x slower than oneDNN, which PyTorch uses
(docs/benchmarks.md, section 2). `conv` is a drop-in NHWC/HWIO convolution whose forward pass
and both gradients are oneDNN primitives (`onednn_conv.cc`), so a whole-epoch `lax.scan`
runs them like any other op. The C++ source is compiled once per machine on first use
(g++, the jaxlib FFI headers and the `onednn-devel-cpu-gomp` wheel) and cached.

Under `jax.vmap` (R trials trained in lockstep, nested vmaps included) each direction stays
one custom call that runs all trials: `onednn_conv.cc` reads the leading trial dimensions
that `vmap_method='expand_dims'` adds. For ResNet-20's five 3x3 layers, forward plus both
gradients at batch 64/128 and R = 2, 4, 8, that is 1.06-1.16x faster than R sequential calls
(the former `vmap_method='sequential'`, kept as `sequential_conv` for the benchmark), 1.1-1.4x
faster than one grouped oneDNN convolution of the R trials, and 4.3-10x faster than XLA's
vmapped convolutions (benchmarks/conv_layers.py; docs/benchmarks.md, section 2g).
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aul_jax.models import conv as conv_lib

SOURCE = Path(__file__).with_name('onednn_conv.cc')
TARGETS = {
  'aul_onednn_conv_forward': 'AulOnednnConvForward',
  'aul_onednn_conv_input_grad': 'AulOnednnConvInputGrad',
  'aul_onednn_conv_weight_grad': 'AulOnednnConvWeightGrad',
}
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class OnednnUnavailable(RuntimeError):
  """The oneDNN convolution cannot be built or loaded here (the message says why)."""


def _onednn_prefix() -> Path:
  """The prefix the onednn wheels install into (lib/libdnnl.so, include/oneapi/dnnl)."""
  return Path(sysconfig.get_paths()['data'])


def _cache_dir() -> Path:
  root = os.environ.get('AUL_JAX_CACHE') or os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'aul_jax'
  )
  return Path(root)


def _build_command(output: Path) -> list[str]:
  prefix = _onednn_prefix()
  return [
    os.environ.get('CXX', 'g++'),
    '-O2',
    '-std=c++17',
    '-shared',
    '-fPIC',
    '-w',  # The FFI headers warn under -Wreturn-type; ours compile clean with -Wall.
    f'-I{jax.ffi.include_dir()}',
    f'-I{prefix / "include"}',
    str(SOURCE),
    f'-L{prefix / "lib"}',
    '-ldnnl',
    f'-Wl,-rpath,{prefix / "lib"}',
    '-o',
    str(output),
  ]


def _missing_prerequisite() -> str | None:
  prefix = _onednn_prefix()
  for path, package in (
    (prefix / 'lib' / 'libdnnl.so', 'onednn-cpu-gomp'),
    (prefix / 'include' / 'oneapi' / 'dnnl' / 'dnnl.hpp', 'onednn-devel-cpu-gomp'),
  ):
    if not path.exists():
      return f'{path} not found (pip install {package})'
  if shutil.which(os.environ.get('CXX', 'g++')) is None:
    return f'no C++ compiler {os.environ.get("CXX", "g++")!r} on PATH'
  return None


def library_path() -> Path:
  """The compiled extension, built into the cache first if this source was never built."""
  missing = _missing_prerequisite()
  if missing:
    raise OnednnUnavailable(missing)
  command = _build_command(Path('OUT'))
  key = hashlib.sha256(
    SOURCE.read_bytes() + ' '.join(command).encode() + jax.__version__.encode()
  ).hexdigest()[:16]
  path = _cache_dir() / f'aul_onednn_conv-{key}.so'
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed, so that concurrent processes never load a
  # half-written file.
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    built = Path(tmp) / path.name
    result = subprocess.run(_build_command(built), capture_output=True, text=True)
    if result.returncode != 0:
      raise OnednnUnavailable(f'building {SOURCE.name} failed:\n{result.stderr[-4000:]}')
    os.replace(built, path)
  return path


@functools.cache
def load() -> None:
  """Builds (once per machine), loads and registers the FFI targets (once per process)."""
  # jaxlib links its own oneDNN 3.7 for XLA's matmuls, but keeps its symbols hidden: ours bind
  # to the wheel's libdnnl.so.3 (tests/test_onednn.py checks which library is mapped).
  library = ctypes.CDLL(str(library_path()))
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), 'cpu')


@functools.cache
def unavailable_reason() -> str | None:
  """None when the oneDNN convolution works here; otherwise why not, logged once.

  `AUL_JAX_ONEDNN=0` in the environment turns it off (the models then use XLA's).
  """
  if os.environ.get('AUL_JAX_ONEDNN', '1') == '0':
    return 'turned off by AUL_JAX_ONEDNN=0'
  try:
    load()
  except (OnednnUnavailable, OSError) as error:
    logging.warning("oneDNN convolution unavailable, using XLA's: %s", error)
    return str(error)
  return None


def _call(target: str, result, a, b, strides, pads, vmap_method: str):
  load()
  # With 'expand_dims', under vmap every operand gets a leading trial dimension (of size 1 when
  # unbatched), and one call runs all trials (onednn_conv.cc).
  out = jax.ffi.ffi_call(target, result, vmap_method=vmap_method)(
    a,
    b,
    strides=np.asarray(strides, np.int64),
    padding=np.asarray([p for pair in pads for p in pair], np.int64),
  )
  # Under shard_map an FFI result is typed as invariant; it varies as its operands do
  # (`conv_lib.as_conv_general_dilated` gives both operands the same varying axes).
  axes = conv_lib.varying_axes(a)
  return lax.pcast(out, axes, to='varying') if axes else out


def _output_shape(x_shape, w_shape, strides, pads) -> tuple[int, ...]:
  spatial = [
    (x_shape[1 + d] + pads[d][0] + pads[d][1] - w_shape[d]) // strides[d] + 1 for d in range(2)
  ]
  return (x_shape[0], *spatial, w_shape[3])


def _make_conv(vmap_method: str):
  """The custom-VJP convolution whose three FFI calls are batched by `vmap_method`."""
  call = functools.partial(_call, vmap_method=vmap_method)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def conv(x_NxHxWxC, w_KxKxCxO, strides, pads):
    """NHWC x HWIO -> NHWC convolution; `pads` are explicit ((lo, hi), (lo, hi)) pairs."""
    if x_NxHxWxC.dtype != w_KxKxCxO.dtype or x_NxHxWxC.dtype not in DTYPES:
      raise TypeError(
        f'oneDNN convolution needs float32 or bfloat16 operands of one dtype, '
        f'got {x_NxHxWxC.dtype} and {w_KxKxCxO.dtype}'
      )
    out = jax.ShapeDtypeStruct(
      _output_shape(x_NxHxWxC.shape, w_KxKxCxO.shape, strides, pads), x_NxHxWxC.dtype
    )
    return call('aul_onednn_conv_forward', out, x_NxHxWxC, w_KxKxCxO, strides, pads)

  def conv_fwd(x, w, strides, pads):
    return conv(x, w, strides, pads), (x, w)

  def conv_bwd(strides, pads, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    dx_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    dx = call('aul_onednn_conv_input_grad', dx_shape, dy, w, strides, pads)
    dw_shape = jax.ShapeDtypeStruct(w.shape, w.dtype)
    dw = call('aul_onednn_conv_weight_grad', dw_shape, x, dy, strides, pads)
    return dx, dw

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


conv = _make_conv('expand_dims')
# R calls per direction under vmap, one after another: the baseline conv_layers.py times.
sequential_conv = _make_conv('sequential')


@functools.cache
def supported_dtypes() -> tuple:
  """The DTYPES this CPU's oneDNN convolves: bfloat16 needs an ISA that has it (on x86,
  AVX-512), so it is probed once with a tiny convolution; () when oneDNN is unavailable."""
  if unavailable_reason() is not None:
    return ()
  x, w = jnp.zeros((1, 2, 2, 1), jnp.bfloat16), jnp.zeros((1, 1, 1, 1), jnp.bfloat16)
  try:
    with jax.ensure_compile_time_eval():  # Runs now, also while a caller is being traced.
      jax.block_until_ready(conv(x, w, (1, 1), ((0, 0), (0, 0))))
  except jax.errors.JaxRuntimeError as error:
    logging.warning("oneDNN has no bfloat16 convolution on this CPU, using XLA's: %s", error)
    return DTYPES[:1]
  return DTYPES
