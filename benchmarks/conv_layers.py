"""One convolution layer's forward and forward+backward time: oneDNN, XLA, and PyTorch.

The ResNets' 3x3 layer shapes (CIFAR-sized, batch 128), each timed three ways in one process,
interleaved: the library's oneDNN convolution (aul_jax/models/onednn.py), the XLA
convolution with canonical-layout gradients it replaced (aul_jax/models/conv.py), and
PyTorch's in channels_last (its faster CPU layout). Explains the train_throughput figures
layer by layer (docs/benchmarks.md, section 2f).

  .venv/bin/python benchmarks/conv_layers.py
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

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


def jax_runs(conv: Callable, x, w, strides, pads) -> dict[str, Callable]:
  """Forward, and forward + both gradients, of `conv` as jitted calls."""
  forward = jax.jit(lambda x, w: conv(x, w, strides, pads))
  dy = jnp.ones_like(forward(x, w))
  both = jax.jit(lambda x, w: jax.vjp(lambda x, w: conv(x, w, strides, pads), x, w)[1](dy))
  return {'fwd': lambda: forward(x, w), 'fwd_bwd': lambda: both(x, w)}


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
  parser.add_argument('--quick', action='store_true', help='tiny sizes, for tests')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_size, args.repeats = 4, 2
  return args


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
  total = {k: round(sum(v[k] for v in layers.values() if k in v), 3) for k in _columns()}
  record = {
    'batch_size': args.batch_size,
    'layers_ms': layers,
    'total_ms': {k: v for k, v in total.items() if v},
    'fwd_bwd_speedup_vs_xla': round(total['xla_fwd_bwd'] / total['onednn_fwd_bwd'], 3),
    'fwd_bwd_ratio_vs_torch': (
      round(total['torch_fwd_bwd'] / total['onednn_fwd_bwd'], 3) if with_torch else None
    ),
    'torch': torch_version() if with_torch else 'skipped',
    'machine': common.machine(),
  }
  common.emit_json(record)
  return record


def _columns() -> list[str]:
  return [f'{impl}_{kind}' for impl in (*JAX_CONVS, 'torch') for kind in ('fwd', 'fwd_bwd')]


if __name__ == '__main__':
  main()
