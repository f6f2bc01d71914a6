"""Whole-epoch `lax.scan` against a Python loop of jitted steps, where dispatch matters.

Both run the same math: the library's epoch (`train.make_train_epoch`: shuffle, gather, step,
per-example losses scattered into the AUL accumulator) as one compiled scan, and the same
epoch as one jitted step per batch called from Python (plus one call to draw the epoch's order
and one to fold the losses into the AUL). Both modes check that they give the same AUL.

  .venv/bin/python benchmarks/epoch_dispatch.py --model mlp --batch-size 64
"""

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from aul_jax import aul, models, train
from benchmarks import common
from benchmarks.train_throughput import CONV_IMPLS, conv_impl

NUM_CLASSES = 10


def make_python_loop_epoch(
  step_fn: train.StepFn, mesh: jax.sharding.Mesh, *, num_examples: int, batch_size: int
) -> Callable:
  """`run_epoch(state, aul_state, data, key, epoch)` as train.make_train_epoch computes it
  (without augmentation), but one host dispatch per step."""
  local_batch = batch_size // mesh.shape[train.DATA_AXIS]
  steps = math.ceil(num_examples / batch_size)

  @jax.jit
  def start(key, epoch):
    order_key, _, _ = jax.random.split(jax.random.fold_in(key, epoch), 3)
    index_SxB, mask_SxB = train.epoch_order(order_key, num_examples, batch_size)
    stats = {
      'loss_sum': jnp.zeros((), jnp.float32),
      'correct': jnp.zeros((), jnp.int32),
      'first_nonfinite_step': jnp.array(-1, jnp.int32),
    }
    return index_SxB, mask_SxB, stats

  def per_device_step(state, aul_state, stats, data, index_SxB, mask_SxB, step, epoch):
    # The library's own per-device step (shared with its scan and streamed epochs), so the
    # two sides differ only in how steps are dispatched.
    index_B, mask_B = index_SxB[step], mask_SxB[step]
    images_b = data['image'][train.device_slice(index_B, local_batch)]
    return train._step_and_scatter(
      (state, aul_state, stats),
      images_b,
      index_B,
      mask_B,
      step,
      None,
      data,
      epoch,
      step_fn=step_fn,
      batch_size=batch_size,
      augment_images=False,
    )

  # The AUL state of `aul.init_aul_state(..., dynamics=False)`: its (N,) AUL, split.
  aul_specs = aul.AULState(P(train.DATA_AXIS), num_examples=num_examples)
  one_step = jax.jit(
    jax.shard_map(
      per_device_step,
      mesh=mesh,
      in_specs=(P(), aul_specs, *(P(),) * 6),
      out_specs=(P(), aul_specs, P()),
    ),
    donate_argnums=(0, 1, 2),
  )
  finish = jax.jit(aul.end_epoch, donate_argnums=(0,))

  def run_epoch(state, aul_state, data, key, epoch):
    epoch = jnp.asarray(epoch, jnp.int32)
    index_SxB, mask_SxB, stats = start(key, epoch)
    for step in range(steps):
      state, aul_state, stats = one_step(
        state, aul_state, stats, data, index_SxB, mask_SxB, jnp.int32(step), epoch
      )
    return state, finish(aul_state, epoch), stats

  return run_epoch


class Runner:
  """One call = `epochs` epochs of one mode, from its own (donated) state."""

  def __init__(self, mode: str, args: argparse.Namespace, mesh, data_host: dict[str, np.ndarray]):
    num_examples = len(data_host['label'])
    model = models.get_model(args.model, NUM_CLASSES, bn_axis_name=train.DATA_AXIS)
    optimizer = train.make_optimizer(
      learning_rate=0.05,
      momentum=0.9,
      weight_decay=1e-4,
      steps_per_epoch=math.ceil(num_examples / args.batch_size),
    )
    image_shape = data_host['image'].shape[1:]
    state = train.create_train_state(model, optimizer, image_shape, jax.random.key(0))
    self.state = train.replicate(state, mesh)
    self.aul_state = train.init_aul_state(mesh, num_examples, 1, None, dynamics=False)
    self.data = train.replicate(data_host, mesh)
    self.key, self.epoch, self.epochs = jax.random.key(1), 0, args.epochs
    self.conv = args.conv_impl
    make = train.make_train_epoch if mode == 'scan' else make_python_loop_epoch
    kwargs = {'augment_images': False} if mode == 'scan' else {}
    self.run_epoch = make(
      train.make_step(model, optimizer),
      mesh,
      num_examples=num_examples,
      batch_size=args.batch_size,
      **kwargs,
    )

  def one_epoch(self) -> jax.Array:
    with conv_impl(self.conv):  # Only matters for the first call, which traces the model.
      self.state, self.aul_state, _ = self.run_epoch(
        self.state, self.aul_state, self.data, self.key, self.epoch
      )
    self.epoch += 1
    return self.aul_state.aul_N

  def __call__(self) -> jax.Array:
    for _ in range(self.epochs):
      aul_N = self.one_epoch()
    return aul_N


def digits_sized_data(num_examples: int) -> dict[str, np.ndarray]:
  """Random 8x8x1 images in [0, 1] with 10 classes, the shape of scikit-learn's digits."""
  rng = np.random.default_rng(0)
  return {
    'image': rng.uniform(size=(num_examples, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32),
    'weight': np.ones(num_examples, np.float32),
  }


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', choices=('mlp', 'lenet'), default='mlp')
  parser.add_argument('--num-examples', type=int, default=1437, help='digits: 1,437 train')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--epochs', type=int, default=20, help='epochs per timed repeat')
  parser.add_argument('--repeats', type=int, default=5, help='timed repeats per mode (median)')
  parser.add_argument('--num-devices', type=int, default=1)
  parser.add_argument(
    '--conv-impl',
    choices=CONV_IMPLS,
    default='library',
    help='convolution backward pass for lenet (see train_throughput.py)',
  )
  parser.add_argument('--quick', action='store_true', help='tiny sizes, for tests')
  args = parser.parse_args(argv)
  if args.quick:
    args.num_examples, args.epochs, args.repeats = 300, 2, 2
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  mesh = train.make_mesh(jax.devices()[: args.num_devices])
  data = digits_sized_data(args.num_examples)
  runners = {mode: Runner(mode, args, mesh, data) for mode in ('scan', 'python_loop')}
  # First epoch of each, from the same initial state: compiles, and checks the maths agree.
  first = {mode: np.asarray(run.one_epoch()) for mode, run in runners.items()}
  same = bool(np.allclose(first['scan'], first['python_loop'], rtol=1e-4, atol=1e-5))
  max_diff = float(np.max(np.abs(first['scan'] - first['python_loop'])))
  times = common.interleaved_seconds(runners, repeats=args.repeats, warmup=0)

  epoch_s = {mode: common.median(t) / args.epochs for mode, t in times.items()}
  steps = math.ceil(args.num_examples / args.batch_size)
  print(
    f'{args.model} ({args.conv_impl} conv) on {args.num_examples} random 8x8x1 examples, '
    f'batch {args.batch_size} '
    f'({steps} steps/epoch), {args.epochs} epochs x {args.repeats} repeats'
  )
  rows = [
    [mode, f'{s * 1e3:.2f}', f'{s / steps * 1e6:.0f}', f'{args.num_examples / s:.0f}']
    for mode, s in epoch_s.items()
  ]
  common.print_table(['mode', 'ms/epoch', 'us/step', 'images/s'], rows)
  print(f'same AUL after one epoch: {same} (max |diff| {max_diff:.2e})')
  record = {
    'model': args.model,
    'conv_impl': args.conv_impl,
    'scan_epoch_s': round(epoch_s['scan'], 6),
    'python_loop_epoch_s': round(epoch_s['python_loop'], 6),
    'speedup': round(epoch_s['python_loop'] / epoch_s['scan'], 3),
    'steps_per_epoch': steps,
    'same_result': same,
    'max_abs_diff_aul': max_diff,
    'num_examples': args.num_examples,
    'batch_size': args.batch_size,
    'epochs_per_repeat': args.epochs,
    'repeats': args.repeats,
    'machine': common.machine(),
  }
  common.emit_json(record)
  return record


if __name__ == '__main__':
  main()
