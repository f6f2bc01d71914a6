"""One convolution layer's forward and forward+backward time: oneDNN, XLA, and PyTorch.

The ResNets' 3x3 layer shapes (CIFAR-sized, batch 128), each timed three ways in one process,
interleaved: the library's oneDNN convolution (aul_jax/models/onednn.py), the XLA
convolution with canonical-layout gradients it replaced (aul_jax/models/conv.py), and
PyTorch's in channels_last (its faster CPU layout). Explains the train_throughput figures
layer by layer (docs/benchmarks.md, section 2f).

Then R trials in lockstep (jax.vmap over stacked inputs and kernels, as the trials axis runs
the train step), forward plus both gradients summed over the layers, at batch 64 and 128 and
R = 1, 2, 4, 8: oneDNN's one custom call per direction against R sequential calls and against
XLA's vmapped convolutions (docs/benchmarks.md, section 2g). 2026-12-03, load ~4.5 (shared):
one call was 1.06-1.16x faster than R calls and 4.3-10x faster than XLA at R >= 2; a grouped
oneDNN convolution of the trials (commit 7510a3d) was 1.14-1.42x slower than one call.

  .venv/bin/python benchmarks/conv_layers.py
"""

import argparse
import ctypes
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aul_jax.models import conv as conv_lib
from aul_jax.models import onednn
from benchmarks import common
from benchmarks.train_throughput import torch_version

# (channels in, channels out, input size, stride): ResNet-20/32's 3x3 layers.
LAYERS = ((16, 16, 32, 1), (32, 32, 16, 1), (64, 64, 8, 1), (16, 32, 32, 2), (32, 64, 16, 2))
JAX_CONVS = {
  'onednn': onednn.conv,
  'xla': conv_lib.make_canonical_conv(conv_lib.weight_grad_canonical),
}
# R trials: oneDNN's one call per direction, oneDNN's R calls in a row, and XLA's vmapped
# convolutions with its own autodiff. (The canonical-gradient XLA convolutions the zoo falls
# back to timed within 8% of these at every R, in one run, so they are left out.)
TRIAL_CONVS = {
  'onednn': onednn.conv,
  'sequential': onednn.sequential_conv,
  'xla': lambda x, w, strides, pads: lax.conv_general_dilated(
    x, w, strides, pads, dimension_numbers=conv_lib.NHWC
  ),
}
TRIAL_IMPLS = tuple(TRIAL_CONVS)


def jax_runs(conv: Callable, x, w, strides, pads) -> dict[str, Callable]:
  """Forward, and forward + both gradients, of `conv` as jitted calls."""
  forward = jax.jit(lambda x, w: conv(x, w, strides, pads))
  dy = jnp.ones_like(forward(x, w))
  both = jax.jit(lambda x, w: jax.vjp(lambda x, w: conv(x, w, strides, pads), x, w)[1](dy))
  return {'fwd': lambda: forward(x, w), 'fwd_bwd': lambda: both(x, w)}


def trials_fwd_bwd(impl: str, x_RxNxHxWxC, w_RxKxKxCxO, strides, pads) -> Callable:
  """Forward + both gradients of R stacked trials (one conv each) as one jitted call."""
  conv = TRIAL_CONVS[impl]

  def one(x, w, dy):
    # y is returned too: XLA would otherwise drop the forward convolution as dead code.
    y, vjp = jax.vjp(lambda x, w: conv(x, w, strides, pads), x, w)
    return y, *vjp(dy)

  y_shape = jax.eval_shape(
    jax.vmap(lambda x, w: conv(x, w, strides, pads)), x_RxNxHxWxC, w_RxKxKxCxO
  )
  dy = jnp.ones(y_shape.shape, y_shape.dtype)
  both = jax.jit(lambda x, w: jax.vmap(one)(x, w, dy))
  return lambda: both(x_RxNxHxWxC, w_RxKxKxCxO)


def recycle_large_buffers() -> bool:
  """Has glibc keep freed buffers of any size for reuse; False where that is not glibc.

  Each jitted call allocates its outputs afresh; glibc gives blocks over 32 MiB (R = 8 stacks
  64 MiB activations) their own mmap, so every call page-faults them in again, which cost
  about a third of a layer's time here. The compiled epoch's scan allocates once per epoch, so the
  figures without that cost are the ones that carry over to training.
  """
  try:
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(-3, 1 << 31)) and bool(libc.mallopt(-1, 1 << 31))  # M_MMAP/M_TRIM
  except (OSError, AttributeError):
    return False


def trials_table(args) -> dict[str, Any]:
  """Forward + both gradients of R trials in lockstep, summed over the layers, by impl."""
  rng = np.random.default_rng(0)
  record = {'malloc_recycles_large_buffers': recycle_large_buffers()}
  rows = []
  for batch in args.trials_batch_sizes:
    for trials in args.trials:
      totals = dict.fromkeys(TRIAL_IMPLS, 0.0)
      for c_in, c_out, size, stride in LAYERS:
        x = jnp.asarray(rng.normal(size=(trials, batch, size, size, c_in)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(trials, 3, 3, c_in, c_out)), jnp.float32)
        pads = conv_lib.explicit_pads(x.shape[1:], w.shape[1:], (stride, stride), 'SAME')
        runs = {i: trials_fwd_bwd(i, x, w, (stride,) * 2, pads) for i in TRIAL_IMPLS}
        times = common.interleaved_seconds(runs, repeats=args.repeats, warmup=1)
        for impl, t in times.items():
          totals[impl] += common.median(t) * 1e3
      ms = {i: round(t, 3) for i, t in totals.items()}
      ratios = {f'{i}_vs_onednn': round(ms[i] / ms['onednn'], 3) for i in TRIAL_IMPLS[1:]}
      record[f'batch{batch}_R{trials}'] = {'ms': ms, **ratios}
      rows.append([batch, trials, *(f'{ms[i]:.1f}' for i in TRIAL_IMPLS), *ratios.values()])
  print(
    f'\nR trials in lockstep (vmap), forward + both gradients, sum of the {len(LAYERS)} layers, '
    f'median of {args.repeats} interleaved calls, ms'
  )
  common.print_table(
    ['batch', 'R', *(f'{i}_ms' for i in TRIAL_IMPLS), *(f'{i}/onednn' for i in TRIAL_IMPLS[1:])],
    rows,
  )
  return record


def torch_runs(x_np, w_np, stride) -> dict[str, Callable]:
  import torch

  x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
  x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
  w = torch.from_numpy(np.ascontiguousarray(w_np.transpose(3, 2, 0, 1))).requires_grad_()
  conv = lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
  dy = torch.ones_like(conv())
  return {'fwd': conv, 'fwd_bwd': lambda: torch.autograd.grad(conv(), (x, w), dy)}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch side')
  parser.add_argument('--torch-threads', type=int, default=None, help='default: all cores')
  parser.add_argument(
    '--trials', type=_ints, default=(1, 2, 4, 8), help='R of the vmapped table; "" skips it'
  )
  parser.add_argument('--trials-batch-sizes', type=_ints, default=(64, 128))
  parser.add_argument('--quick', action='store_true', help='tiny sizes, for tests')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_size, args.repeats = 4, 2
    args.trials, args.trials_batch_sizes = (1, 2), (4,)
  return args


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(t) for t in text.split(',') if t)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if onednn.unavailable_reason():
    raise SystemExit(
      f'conv_layers: the oneDNN convolution is unavailable: {onednn.unavailable_reason()}'
    )
  with_torch = not args.no_torch and torch_version() is not None
  if with_torch and args.torch_threads:
    import torch

    torch.set_num_threads(args.torch_threads)
  rng = np.random.default_rng(0)
  rows, layers = [], {}
  for c_in, c_out, size, stride in LAYERS:
    name = f'{c_in}->{c_out} {size}x{size} s{stride}'
    x = rng.normal(size=(args.batch_size, size, size, c_in)).astype(np.float32)
    w = rng.normal(size=(3, 3, c_in, c_out)).astype(np.float32)
    pads = conv_lib.explicit_pads(x.shape, w.shape, (stride, stride), 'SAME')
    runs = {}
    for impl, conv in JAX_CONVS.items():
      for kind, run in jax_runs(conv, jnp.asarray(x), jnp.asarray(w), (stride,) * 2, pads).items():
        runs[f'{impl}_{kind}'] = run
    if with_torch:
      runs.update({f'torch_{kind}': run for kind, run in torch_runs(x, w, stride).items()})
    times = common.interleaved_seconds(runs, repeats=args.repeats, warmup=2)
    ms = {k: round(common.median(t) * 1e3, 3) for k, t in times.items()}
    layers[name] = ms
    rows.append([name, *(f'{ms.get(k, float("nan")):.2f}' for k in _columns())])
  print(f'batch {args.batch_size}, median of {args.repeats} interleaved calls, ms')
  common.print_table(['layer', *_columns()], rows)
  trials = trials_table(args) if args.trials else None
  total = {k: round(sum(v[k] for v in layers.values() if k in v), 3) for k in _columns()}
  record = {
    'batch_size': args.batch_size,
    'layers_ms': layers,
    'total_ms': {k: v for k, v in total.items() if v},
    'fwd_bwd_speedup_vs_xla': round(total['xla_fwd_bwd'] / total['onednn_fwd_bwd'], 3),
    'fwd_bwd_ratio_vs_torch': (
      round(total['torch_fwd_bwd'] / total['onednn_fwd_bwd'], 3) if with_torch else None
    ),
    'trials_fwd_bwd': trials,
    'torch': torch_version() if with_torch else 'skipped',
    'machine': common.machine(),
  }
  common.emit_json(record)
  return record


def _columns() -> list[str]:
  return [f'{impl}_{kind}' for impl in (*JAX_CONVS, 'torch') for kind in ('fwd', 'fwd_bwd')]


if __name__ == '__main__':
  main()
