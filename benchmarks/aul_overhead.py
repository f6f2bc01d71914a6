"""What the AUL accumulator (the other training dynamics, and the optional loss history)
costs an epoch, in time and memory.

Times the library's compiled epoch (`train.make_train_epoch`: per-example losses, margins,
confidences and correctness gathered and scattered into (N,) vectors, folded into the
donated AUL state with its dynamics) against the same epoch without any of it: the same
shuffle, batches and step, but no gather, no scatter, no accumulator. Mode `aul_only`
scatters the losses alone (`aul.init_aul_state(..., dynamics=False)`). Modes are timed
interleaved, epoch by epoch, after warm-up; medians are reported. Memory is each compiled
epoch's buffer sizes (`compiled.memory_analysis()`), plus the bytes of the AUL state: O(N)
for the accumulators, O(N*T) for the history.

  .venv/bin/python benchmarks/aul_overhead.py --model mlp --num-examples 50000
"""

import argparse
import functools
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

NUM_CLASSES = 10
MODES = ('no_aul', 'aul_only', 'aul', 'aul_history_float32', 'aul_history_bfloat16')


def make_epoch_without_aul(
  step_fn: train.StepFn, mesh: jax.sharding.Mesh, *, num_examples: int, batch_size: int
) -> Callable:
  """train.make_train_epoch less the AUL: `run_epoch(state, data, key, epoch) -> (state, stats)`.

  Same shuffle, padded last batch, gather and step; the epoch statistics are reduced with
  psum instead of from the gathered per-example losses, and nothing is scattered.
  """
  local_batch = batch_size // mesh.shape[train.DATA_AXIS]

  def per_device_epoch(state, data, key, epoch):
    order_key, _, _ = jax.random.split(key, 3)  # As the library splits it.
    index_SxB, mask_SxB = train.epoch_order(order_key, num_examples, batch_size)

    def body(carry, step_inputs):
      state, stats = carry
      step, index_B, mask_B = step_inputs
      index_b = train.device_slice(index_B, local_batch)
      mask_b = train.device_slice(mask_B, local_batch)
      batch = {
        'image': data['image'][index_b],
        'label': data['label'][index_b],
        'weight': jnp.where(mask_b, data['weight'][index_b], 0.0),
      }
      state, metrics = step_fn(state, batch, epoch)
      loss_b = jnp.where(mask_b, metrics['loss'], 0.0)
      nonfinite = jax.lax.psum(jnp.sum(~jnp.isfinite(loss_b)), train.DATA_AXIS)
      stats = {
        'loss_sum': stats['loss_sum'] + jax.lax.psum(jnp.sum(loss_b), train.DATA_AXIS),
        'correct': stats['correct']
        + jax.lax.psum(jnp.sum(mask_b & metrics['correct']), train.DATA_AXIS),
        'first_nonfinite_step': jnp.where(
          (stats['first_nonfinite_step'] < 0) & (nonfinite > 0),
          step,
          stats['first_nonfinite_step'],
        ),
      }
      return (state, stats), None

    stats = {
      'loss_sum': jnp.zeros((), jnp.float32),
      'correct': jnp.zeros((), jnp.int32),
      'first_nonfinite_step': jnp.array(-1, jnp.int32),
    }
    steps = jnp.arange(index_SxB.shape[0])
    (state, stats), _ = jax.lax.scan(body, (state, stats), (steps, index_SxB, mask_SxB))
    return state, stats

  sharded_epoch = jax.shard_map(
    per_device_epoch, mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=(P(), P())
  )

  @functools.partial(jax.jit, donate_argnums=(0,))
  def run_epoch(state, data, key, epoch):
    epoch = jnp.asarray(epoch, jnp.int32)
    return sharded_epoch(state, data, jax.random.fold_in(key, epoch), epoch)

  return run_epoch


class Mode:
  """One call = one epoch in this mode; keeps its own (donated) state between calls."""

  def __init__(self, mode: str, args: argparse.Namespace, mesh, data_host: dict[str, np.ndarray]):
    self.mode = mode
    num_examples = len(data_host['label'])
    model = models.get_model(args.model, NUM_CLASSES, bn_axis_name=train.DATA_AXIS)
    steps = -(-num_examples // args.batch_size)
    optimizer = train.make_optimizer(
      learning_rate=0.01, momentum=0.9, weight_decay=1e-4, steps_per_epoch=steps
    )
    state = train.create_train_state(
      model, optimizer, data_host['image'].shape[1:], jax.random.key(0)
    )
    self.state = train.replicate(state, mesh)
    self.data = train.replicate(data_host, mesh)
    self.key, self.epoch, self.history_epochs = jax.random.key(1), 0, args.history_epochs
    epoch = jnp.zeros((), jnp.int32)
    step_fn = train.make_step(model, optimizer)
    if mode == 'no_aul':
      self.aul_state = None
      run = make_epoch_without_aul(
        step_fn, mesh, num_examples=num_examples, batch_size=args.batch_size
      )
      lower_args = (self.state, self.data, self.key, epoch)
    else:
      history = mode.removeprefix('aul_history_') if mode.startswith('aul_history_') else None
      self.aul_state = train.init_aul_state(
        mesh, num_examples, args.history_epochs, history, dynamics=mode != 'aul_only'
      )
      run = train.make_train_epoch(
        step_fn, mesh, num_examples=num_examples, batch_size=args.batch_size, augment_images=False
      )
      lower_args = (self.state, self.aul_state, self.data, self.key, epoch)
    leaves = jax.tree.leaves(self.aul_state)
    self.state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
    # The executable that is timed is the one whose memory is analysed.
    self.compiled = run.lower(*lower_args).compile()
    self.memory = common.compiled_memory(self.compiled)

  def __call__(self) -> Any:
    epoch = jnp.asarray(self.epoch % self.history_epochs, jnp.int32)
    if self.aul_state is None:
      self.state, stats = self.compiled(self.state, self.data, self.key, epoch)
    else:
      self.state, self.aul_state, stats = self.compiled(
        self.state, self.aul_state, self.data, self.key, epoch
      )
    self.epoch += 1
    return stats


def add_epoch_rows(state: tuple, epoch_NxQ: jax.Array, epoch: jax.Array) -> tuple:
  """aul.add_epoch's AUL and history, the history kept as (T, N) and written by rows: the
  layout the library had before it kept (N, T), one row per example, everywhere."""
  aul_N, history_TxN = state
  epoch_loss_N = epoch_NxQ[:, 0]
  row_1xN = epoch_loss_N.astype(history_TxN.dtype)[None]
  history_TxN = jax.lax.dynamic_update_slice(history_TxN, row_1xN, (epoch, jnp.zeros_like(epoch)))
  return aul_N + epoch_loss_N, history_TxN


def time_history_update(num_examples: int, num_epochs: int, repeats: int) -> dict[str, Any]:
  """The per-epoch fold into the AUL state alone: aul.add_epoch ((N, T) history, a column
  per epoch) against add_epoch_rows ((T, N), a row per epoch)."""
  out = {}
  loss_N = jnp.linspace(0.0, 3.0, num_examples, dtype=jnp.float32)[:, None]
  for dtype in ('float32', 'bfloat16'):
    library = aul.init_aul_state(num_examples, num_epochs, dtype, dynamics=False)
    rows = (jnp.zeros(num_examples), jnp.zeros((num_epochs, num_examples), jnp.dtype(dtype)))
    for name, fn, state in (('library', aul.add_epoch, library), ('rows', add_epoch_rows, rows)):
      compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, loss_N, jnp.int32(0)).compile()
      box = {'state': state, 'epoch': 0}

      def call(box=box, compiled=compiled):
        box['epoch'] = (box['epoch'] + 1) % num_epochs
        box['state'] = compiled(box['state'], loss_N, jnp.int32(box['epoch']))
        return box['state']

      seconds = common.median(common.median_seconds(call, repeats=repeats, warmup=2))
      memory = common.compiled_memory(compiled) or {}
      temp = memory.get('temp_bytes')
      out[f'{dtype}_{name}'] = {'ms': round(seconds * 1e3, 4), 'temp_bytes': temp}
  return out


def random_data(num_examples: int, image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
    'image': rng.normal(size=(num_examples, *image_shape)).astype(np.float32),
    'label': rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32),
    'weight': np.ones(num_examples, np.float32),
  }


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', choices=('mlp', 'lenet'), default='mlp')
  parser.add_argument('--num-examples', type=int, default=100_000)
  parser.add_argument('--image-shape', default='8x8x1', help='HxWxC, e.g. 8x8x1 or 32x32x3')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--history-epochs', type=int, default=150, help='T of the (N, T) history')
  parser.add_argument('--repeats', type=int, default=7, help='timed epochs per mode (median)')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--num-devices', type=int, default=1)
  parser.add_argument('--quick', action='store_true', help='tiny sizes, for tests')
  args = parser.parse_args(argv)
  if args.quick:
    args.num_examples, args.history_epochs, args.repeats = 2_000, 10, 2
  args.image_shape = tuple(int(d) for d in args.image_shape.lower().split('x'))
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  mesh = train.make_mesh(jax.devices()[: args.num_devices])
  data = random_data(args.num_examples, args.image_shape)
  modes = {mode: Mode(mode, args, mesh, data) for mode in MODES}
  times = common.interleaved_seconds(modes, repeats=args.repeats, warmup=args.warmup)

  epoch_s = {mode: common.median(t) for mode, t in times.items()}
  base = epoch_s['no_aul']
  overhead = {mode: (epoch_s[mode] - base) / base for mode in MODES}
  n, t = args.num_examples, args.history_epochs
  state_bytes = {mode: modes[mode].state_bytes for mode in MODES}
  shape = 'x'.join(map(str, args.image_shape))
  print(f'{args.model} on {n} random {shape} examples, batch {args.batch_size}, T = {t}')
  rows = []
  for mode in MODES:
    peak = (modes[mode].memory or {}).get('peak_bytes')
    mib = f'{peak / 2**20:.1f}' if peak is not None else 'n/a'
    rows.append([mode, f'{epoch_s[mode]:.4f}', f'{overhead[mode]:+.4f}', state_bytes[mode], mib])
  common.print_table(['mode', 'epoch s', 'overhead', 'AUL state bytes', 'peak MiB'], rows)

  update = time_history_update(n, t, repeats=max(5, 3 * args.repeats))
  print('Folding one epoch into the AUL state (N x T history, against T x N rows):')
  common.print_table(
    ['history, update', 'ms', 'temp bytes'],
    [[name, v['ms'], v['temp_bytes']] for name, v in update.items()],
  )
  record = {
    'model': args.model,
    'num_examples': n,
    'overhead': round(overhead['aul'], 4),
    'aul_only_overhead': round(overhead['aul_only'], 4),
    'history_float32_overhead': round(overhead['aul_history_float32'], 4),
    'history_bfloat16_overhead': round(overhead['aul_history_bfloat16'], 4),
    'epoch_s': {mode: round(s, 5) for mode, s in epoch_s.items()},
    'epoch_s_min': {mode: round(min(t), 5) for mode, t in times.items()},
    'aul_state_bytes': state_bytes,
    'memory': {mode: modes[mode].memory for mode in MODES},
    'history_update': update,
    'device_peak_bytes': common.device_peak_bytes(),
    'image_shape': list(args.image_shape),
    'batch_size': args.batch_size,
    'history_epochs': t,
    'repeats': args.repeats,
    'machine': common.machine(),
  }
  common.emit_json(record)
  return record


if __name__ == '__main__':
  main()
