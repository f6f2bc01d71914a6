"""Images/s of the AUL train step, against the same architecture and recipe in PyTorch.

The JAX side is the library's compiled epoch (`train.make_train_epoch` over `train.make_step`:
one `lax.scan` under `jax.shard_map`, per-example losses scattered into the AUL accumulator).
The PyTorch side runs the same architecture, SGD (momentum 0.9, weight decay), train-mode
BatchNorm, and per-example cross-entropy (reduction='none') scattered by index into an
accumulator tensor, in NCHW and in channels_last; the faster layout is `torch_images_per_s`.
It runs on CUDA when torch sees a GPU (`--torch-device`), so that on a GPU machine the ratio
is JAX on the GPU against PyTorch on the GPU; each `--dtype` is timed on both sides
(bfloat16 is `torch.autocast` there). Both see random 32x32x3 data, are warmed up, and are
timed interleaved epoch by epoch.

  .venv/bin/python benchmarks/train_throughput.py --model resnet20

`--conv-impl` selects the zoo's convolution (see docs/benchmarks.md, section 2):
  library        (default) the models exactly as aul_jax builds them: on a CPU oneDNN's
                 (aul_jax/models/onednn.py) where it builds, else canonical_vjp; lax's own
                 convolution on a GPU or TPU.
  onednn         forward pass and both gradients as oneDNN primitives (XLA FFI custom calls).
  canonical_vjp  a custom VJP whose input and weight gradients are convolutions already in
                 XLA:CPU's canonical layout (aul_jax/models/conv.py). Inside a scan (a while
                 loop) XLA:CPU does not canonicalise lax's own gradient convolutions and runs
                 them ~100x slower.
  im2col_vjp     as canonical_vjp, but the weight gradient is im2col patches times a matmul.
  lax            lax's own convolution and gradients (flax's default), for the record.
A comma-separated list of impls (and of `--dtype`s) times every pair in the same run; the
first pair is the headline `images_per_s`.
"""

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from aul_jax import models, train
from aul_jax.models import conv as conv_lib
from aul_jax.models import layers
from aul_jax.models.conv import (  # noqa: F401 (re-exported for the tests)
  NHWC,
  input_grad_canonical,
  make_conv_general_dilated,
  weight_grad_canonical,
)
from benchmarks import common

MODELS = ('mlp', 'lenet', 'resnet20', 'resnet32')
CONV_IMPLS = ('library', 'onednn', 'canonical_vjp', 'im2col_vjp', 'lax')
DTYPES = ('float32', 'bfloat16')
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


# The convolution experiments: drop-in replacements for lax.conv_general_dilated.


def weight_grad_im2col(x_NxHxWxC, dy_NxHoxWoxO, w_shape, strides, pads) -> jax.Array:
  """dW as im2col patches (N*Ho*Wo, kh*kw*C) transposed times dy (N*Ho*Wo, O)."""
  kh, kw, c, o = w_shape
  n, ho, wo, _ = dy_NxHoxWoxO.shape
  x_pad = jnp.pad(x_NxHxWxC, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  (sh, sw), (eh, ew) = strides, (strides[0] * (ho - 1) + 1, strides[1] * (wo - 1) + 1)
  taps = [x_pad[:, i : i + eh : sh, j : j + ew : sw] for i in range(kh) for j in range(kw)]
  patches_MxK = jnp.concatenate(taps, axis=-1).reshape(n * ho * wo, kh * kw * c)
  return (patches_MxK.T @ dy_NxHoxWoxO.reshape(-1, o)).reshape(kh, kw, c, o)


def drop_in_conv(name: str) -> Callable | None:
  """The convolution `--conv-impl name` gives nn.Conv (None: lax's own, flax's default)."""
  return {
    'onednn': layers.ONEDNN_CONV_GENERAL_DILATED,
    'canonical_vjp': conv_lib.canonical_conv_general_dilated,
    'im2col_vjp': make_conv_general_dilated(weight_grad_im2col),
    'lax': None,
  }[name]


@contextlib.contextmanager
def conv_impl(name: str) -> Iterator[None]:
  """While active (i.e. while a model is traced), the zoo's convolutions are `name`."""
  if name == 'library':
    yield
    return
  conv = drop_in_conv(name)
  with mock.patch.object(layers, 'fast_conv_general_dilated', lambda: conv):
    yield


# The JAX side.


def random_data(num_examples: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    'image': rng.normal(size=(num_examples, *IMAGE_SHAPE)).astype(np.float32),
    'label': rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32),
    'weight': np.ones(num_examples, np.float32),
  }


class JaxEpoch:
  """One call = one compiled AUL epoch of `steps` steps (shuffle, steps, loss scatter)."""

  def __init__(self, model_name, *, batch_size, steps, conv, dtype, num_devices, data):
    self.mesh = train.make_mesh(jax.devices()[:num_devices])
    self.num_examples = batch_size * steps
    model = models.get_model(
      model_name, NUM_CLASSES, bn_axis_name=train.DATA_AXIS, dtype=jnp.dtype(dtype)
    )
    optimizer = train.make_optimizer(
      learning_rate=LEARNING_RATE,
      momentum=MOMENTUM,
      weight_decay=WEIGHT_DECAY,
      steps_per_epoch=steps,
    )
    self.conv = conv
    with conv_impl(conv):
      state = train.create_train_state(model, optimizer, IMAGE_SHAPE, jax.random.key(0))
    self.state = train.replicate(state, self.mesh)
    self.aul_state = train.init_aul_state(self.mesh, self.num_examples, 1, None)
    self.data = train.replicate(data, self.mesh)
    self.key = jax.random.key(1)
    self.epoch = 0
    self.run_epoch = train.make_train_epoch(
      train.make_step(model, optimizer),
      self.mesh,
      num_examples=self.num_examples,
      batch_size=batch_size,
      augment_images=False,
    )

  def __call__(self) -> jax.Array:
    with conv_impl(self.conv):  # Only matters for the first call, which traces the model.
      self.state, self.aul_state, _ = self.run_epoch(
        self.state, self.aul_state, self.data, self.key, self.epoch
      )
    self.epoch += 1
    return self.aul_state.aul_N


# The PyTorch side.


def torch_version() -> str | None:
  try:
    import torch
  except ImportError:
    return None
  return torch.__version__


def torch_model(name: str) -> Any:
  """The same architectures as aul_jax.models, in PyTorch (NCHW)."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  class BasicBlock(nn.Module):
    def __init__(self, in_features, features, stride):
      super().__init__()
      self.stride, self.extra = stride, features - in_features
      self.conv1 = nn.Conv2d(in_features, features, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(features)
      self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(features)

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      shortcut = x[:, :, :: self.stride, :: self.stride]
      if self.extra:  # Option A: zero-padded channels.
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
      return F.relu(y + shortcut)

  def resnet(depth):
    blocks = (depth - 2) // 6
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    in_features = 16
    for stage, features in enumerate((16, 32, 64)):
      for block in range(blocks):
        layers.append(BasicBlock(in_features, features, 2 if stage and not block else 1))
        in_features = features
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, NUM_CLASSES)]
    return nn.Sequential(*layers)

  if name == 'mlp':
    size = int(np.prod(IMAGE_SHAPE))
    return nn.Sequential(
      nn.Flatten(),
      nn.Linear(size, 512),
      nn.ReLU(),
      nn.Linear(512, 512),
      nn.ReLU(),
      nn.Linear(512, NUM_CLASSES),
    )
  if name == 'lenet':
    return nn.Sequential(
      nn.Conv2d(3, 6, 5, padding=2),
      nn.ReLU(),
      nn.MaxPool2d(2),
      nn.Conv2d(6, 16, 5, padding=2),
      nn.ReLU(),
      nn.MaxPool2d(2),
      nn.Flatten(),
      nn.Linear(16 * 8 * 8, 120),
      nn.ReLU(),
      nn.Linear(120, 84),
      nn.ReLU(),
      nn.Linear(84, NUM_CLASSES),
    )
  torch.manual_seed(0)
  return resnet(int(name.removeprefix('resnet')))


def torch_device(name: str) -> str:
  """'cuda' or 'cpu' for `--torch-device`; 'auto' is CUDA whenever torch sees a GPU."""
  if name != 'auto':
    return name
  import torch

  return 'cuda' if torch.cuda.is_available() else 'cpu'


class TorchEpoch:
  """One call = one epoch of `steps` SGD steps with per-example losses scattered by index.

  On 'cuda' everything (model, data, accumulator, shuffle) lives on the GPU, cuDNN picks its
  fastest algorithms (`cudnn.benchmark`), and the call ends with `torch.cuda.synchronize()`
  so that the host clock read after it covers the GPU's work. bfloat16 is the usual
  `torch.autocast` mixed precision (float32 parameters, bfloat16 convolutions).
  """

  def __init__(self, model_name, *, batch_size, steps, channels_last, data, threads, device, dtype):
    import torch

    torch.set_num_threads(threads)
    self.torch = torch
    self.device = device
    if device == 'cuda':
      torch.backends.cudnn.benchmark = True
    self.batch_size, self.steps = batch_size, steps
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = torch_model(model_name).train().to(device, memory_format=self.memory_format)
    images = torch.from_numpy(np.ascontiguousarray(data['image'].transpose(0, 3, 1, 2)))
    self.images = images.to(device).contiguous(memory_format=self.memory_format)
    self.labels = torch.from_numpy(data['label'].astype(np.int64)).to(device)
    self.accumulator = torch.zeros(len(self.labels), device=device)
    self.optimizer = torch.optim.SGD(
      self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    self.autocast = torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16')

  def __call__(self) -> None:
    torch = self.torch
    order = torch.randperm(len(self.labels), device=self.device)
    for step in range(self.steps):
      index = order[step * self.batch_size : (step + 1) * self.batch_size]
      images = self.images[index].contiguous(memory_format=self.memory_format)
      with self.autocast:
        logits = self.model(images)
      loss_b = torch.nn.functional.cross_entropy(
        logits.float(), self.labels[index], reduction='none'
      )
      self.accumulator.index_add_(0, index, loss_b.detach())
      self.optimizer.zero_grad(set_to_none=True)
      loss_b.mean().backward()
      self.optimizer.step()
    if self.device == 'cuda':
      torch.cuda.synchronize()  # The GPU runs asynchronously; the caller reads a host clock.


# The benchmark.


def torch_side(layout: str, dtype: str) -> str:
  """A PyTorch side's name: torch_nchw, torch_channels_last (float32), or with _bfloat16."""
  return f'torch_{layout}' + ('' if dtype == 'float32' else f'_{dtype}')


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
  def parse(text: str) -> list[str]:
    values = text.split(',')
    for value in values:
      if value not in allowed:
        raise argparse.ArgumentTypeError(f'{value!r} is not one of {", ".join(allowed)}')
    return values

  return parse


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', choices=MODELS, default='resnet20')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=8, help='steps per timed epoch')
  parser.add_argument('--repeats', type=int, default=5, help='timed epochs per side (median)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed epochs per side first')
  parser.add_argument(
    '--conv-impl',
    type=_choices(CONV_IMPLS),
    default=['library'],
    help=f'one or more (comma-separated) of {", ".join(CONV_IMPLS)}',
  )
  parser.add_argument(
    '--dtype',
    type=_choices(DTYPES),
    default=['float32'],
    help='compute dtype(s), comma-separated; every conv-impl x dtype pair is timed',
  )
  parser.add_argument('--num-devices', type=int, default=1)
  parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch side')
  parser.add_argument('--torch-threads', type=int, default=os.cpu_count() or 1)
  parser.add_argument(
    '--torch-device',
    choices=('auto', 'cpu', 'cuda'),
    default='auto',
    help='where the PyTorch side runs; auto: CUDA when torch sees a GPU, else the CPU',
  )
  parser.add_argument('--quick', action='store_true', help='tiny sizes, for tests')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_size, args.steps, args.repeats, args.warmup = 32, 2, 2, 1
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  data = random_data(args.batch_size * args.steps)
  # The first JAX variant is the headline figure; any others are timed alongside it.
  variants = [(conv, dtype) for conv in args.conv_impl for dtype in args.dtype]
  jax_sides = [f'jax_{conv}_{dtype}' for conv, dtype in variants]
  sides: dict[str, Callable] = {}
  for name, (conv, dtype) in zip(jax_sides, variants, strict=True):
    sides[name] = JaxEpoch(
      args.model,
      batch_size=args.batch_size,
      steps=args.steps,
      conv=conv,
      dtype=dtype,
      num_devices=args.num_devices,
      data=data,
    )
  version = None if args.no_torch else torch_version()
  device = None if version is None else torch_device(args.torch_device)
  if version is not None:
    for dtype in args.dtype:
      for layout in ('nchw', 'channels_last'):
        sides[torch_side(layout, dtype)] = TorchEpoch(
          args.model,
          batch_size=args.batch_size,
          steps=args.steps,
          channels_last=layout == 'channels_last',
          data=data,
          threads=args.torch_threads,
          device=device,
          dtype=dtype,
        )
  times = common.interleaved_seconds(sides, repeats=args.repeats, warmup=args.warmup)

  images = args.batch_size * args.steps
  rate = {name: images / common.median(t) for name, t in times.items()}
  step_ms = {name: common.median(t) / args.steps * 1e3 for name, t in times.items()}
  rows = [[name, f'{step_ms[name]:.1f}', f'{rate[name]:.1f}'] for name in times]
  print(f'{args.model}, batch {args.batch_size}, {args.steps} steps/epoch, {args.repeats} repeats')
  common.print_table(['side', 'ms/step', 'images/s'], rows)

  record: dict[str, Any] = {
    'model': args.model,
    'images_per_s': round(rate[jax_sides[0]], 2),
    'torch_images_per_s': None,
    'ratio_vs_torch': None,
  }
  if version is None:
    reason = 'not requested (--no-torch)' if args.no_torch else 'torch is not installed'
    print(f'PyTorch side skipped: {reason}')
    record['torch'] = f'skipped: {reason}'
  else:
    # Each JAX dtype against PyTorch's faster layout in the same dtype; the headline is
    # the first JAX variant's.
    best = {
      d: max((torch_side(lay, d) for lay in ('nchw', 'channels_last')), key=rate.get)
      for d in args.dtype
    }
    headline = best[variants[0][1]]
    record.update(
      torch_images_per_s=round(rate[headline], 2),
      ratio_vs_torch=round(rate[jax_sides[0]] / rate[headline], 3),
      torch_layout='channels_last' if 'channels_last' in headline else 'nchw',
      torch_nchw_images_per_s=round(rate[torch_side('nchw', variants[0][1])], 2),
      torch_channels_last_images_per_s=round(rate[torch_side('channels_last', variants[0][1])], 2),
      torch_images_per_s_by_side={
        name.removeprefix('torch_'): round(rate[name], 2)
        for name in times
        if name.startswith('torch_')
      },
      ratio_vs_torch_by_variant={
        name.removeprefix('jax_'): round(rate[name] / rate[best[dtype]], 3)
        for name, (_, dtype) in zip(jax_sides, variants, strict=True)
      },
      torch=version,
      torch_device=device,
      torch_threads=sides[headline].torch.get_num_threads(),
    )
  record.update(
    conv_impl=variants[0][0],
    dtype=variants[0][1],
    jax_images_per_s={name.removeprefix('jax_'): round(rate[name], 2) for name in jax_sides},
    batch_size=args.batch_size,
    steps=args.steps,
    repeats=args.repeats,
    num_devices=args.num_devices,
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    machine=common.machine(),
  )
  common.emit_json(record)
  return record


if __name__ == '__main__':
  main()
