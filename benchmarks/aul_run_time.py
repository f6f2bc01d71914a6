"""How long the paper's AUL detection run takes: seconds per epoch, compile time, and the
projected (and, where it fits, measured) time of all its epochs, against the FLOP floor.

Times the library's real detection epoch, as `launch.py` runs it: `train.make_train_epoch`
over `train.make_step` (one `lax.scan` under `jax.shard_map`: shuffle, pad-4 crop and flip
on the device, every SGD step, the per-example losses scattered into the AUL accumulator,
and the AUL's AUROC against a known noise mask each epoch), driven by `train.train_epochs`
(metrics read one epoch late). The data are random images and labels of CIFAR's shape
(45,000 x 32x32x3, 10 classes), as many as the paper trains on; the recipe is the paper's
(batch 64, SGD momentum 0.9, learning rate 0.1, weight decay 1e-4).

  .venv/bin/python benchmarks/aul_run_time.py --model resnet32 --epochs 5

The first epoch (compile + one epoch) is timed alone; then `--epochs` more are timed in
chunks of `--chunk` until done or past `--time-limit-s`. The projection for
`--target-epochs` is first epoch + (target - 1) x seconds per later epoch; with
`--epochs` = target - 1 the whole run is measured (`full_run_measured`). The floor is
target x N x training FLOPs per image over a dense matrix-product rate measured here, in the
run's dtype (float32 at the backend's default precision, which is TF32 on recent NVIDIA
GPUs; or bfloat16).
"""

import argparse
import collections
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from aul_jax import models, retrain, train
from benchmarks import common

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
NOISE_RATE = 0.4
# Training FLOPs per image (forward + backward, ~3x the forward pass's 2 x MACs); None: use
# XLA's cost analysis of one step.
FLOPS_PER_IMAGE = {'resnet32': 412e6}
_START = time.perf_counter()


def log(message: str) -> None:
  """A progress line on stderr with the seconds since start-up, to see where the time goes."""
  print(f'[{time.perf_counter() - _START:7.1f} s] {message}', file=sys.stderr, flush=True)


def random_data(num_examples: int, *, truth: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """CIFAR-shaped random images and labels; with `truth`, a random 40% 'mislabeled' mask."""
  rng = np.random.default_rng(seed)
  data = {
    'image': rng.normal(size=(num_examples, *IMAGE_SHAPE)).astype(np.float32),
    'label': rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32),
    'weight': np.ones(num_examples, np.float32),
  }
  if truth:
    data['is_mislabeled'] = rng.random(num_examples) < NOISE_RATE
  return data


def make_run(args: argparse.Namespace, num_examples: int) -> tuple[Any, Any, Any]:
  """The library's detection epoch for this recipe, a fresh replicated state and its mesh."""
  mesh = train.make_mesh(jax.devices()[: args.num_devices])
  model = models.get_model(
    args.model, NUM_CLASSES, bn_axis_name=train.DATA_AXIS, dtype=jnp.dtype(args.dtype)
  )
  optimizer = train.make_optimizer(
    learning_rate=args.learning_rate,
    momentum=0.9,
    weight_decay=1e-4,
    steps_per_epoch=retrain.steps_per_epoch(num_examples, args.batch_size),
  )
  state = train.create_train_state(model, optimizer, IMAGE_SHAPE, jax.random.key(0))
  run_epoch = train.make_train_epoch(
    train.make_step(model, optimizer),
    mesh,
    num_examples=num_examples,
    batch_size=args.batch_size,
    augment_images=not args.no_augment,
  )
  return run_epoch, train.replicate(state, mesh), mesh


def xla_flops_per_image(args: argparse.Namespace) -> float | None:
  """XLA's count of one training step's FLOPs per image (a one-step epoch, not compiled)."""
  run_epoch, state, mesh = make_run(args, args.batch_size)
  data = train.replicate(random_data(args.batch_size, truth=False), mesh)
  aul_state = train.init_aul_state(mesh, args.batch_size, 1, None)
  try:
    cost = run_epoch.lower(state, aul_state, data, jax.random.key(1), 0).cost_analysis()
  except Exception as e:  # Not every backend or version implements it.
    log(f'no XLA cost analysis: {e!r}')
    return None
  flops = (cost or {}).get('flops')
  return float(flops) / args.batch_size if flops else None


def time_run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs 1 + `args.epochs` epochs (or fewer, past the time limit); returns the timings."""
  run_epoch, state, mesh = make_run(args, args.num_examples)
  aul_state = train.init_aul_state(mesh, args.num_examples, 1, None)
  data = train.replicate(random_data(args.num_examples, truth=not args.no_truth), mesh)
  jax.block_until_ready(data)
  log('data on the device; compiling and running the first epoch')
  key = jax.random.key(1)
  metrics: list[dict[str, float]] = []

  def epochs(state, aul_state, start, stop):
    return train.train_epochs(
      run_epoch,
      state,
      aul_state,
      data,
      key,
      num_epochs=stop,
      num_examples=args.num_examples,
      on_epoch=lambda epoch, m: metrics.append(m),
      start_epoch=start,
    )

  started = time.perf_counter()
  state, aul_state = epochs(state, aul_state, 0, 1)  # Compile + the first epoch.
  first_epoch_s = time.perf_counter() - started
  log(f'first epoch done in {first_epoch_s:.2f} s')
  chunks: list[tuple[int, float]] = []
  done = 1
  while done < 1 + args.epochs and time.perf_counter() - started < args.time_limit_s:
    stop = min(done + args.chunk, 1 + args.epochs)
    chunk_started = time.perf_counter()
    state, aul_state = epochs(state, aul_state, done, stop)
    chunks.append((stop - done, time.perf_counter() - chunk_started))
    log(f'epochs {done + 1}-{stop}: {chunks[-1][1] / chunks[-1][0]:.3f} s each')
    done = stop
  measured_s = time.perf_counter() - started
  timed_epochs = sum(n for n, _ in chunks)
  timed_s = sum(s for _, s in chunks)
  profile = None
  if args.profile:
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        epochs(state, aul_state, done, done + 1)
      profile = summarise_trace(trace_dir)
    log('profiled one more epoch')
  return {
    'first_epoch_s': first_epoch_s,
    'epoch_s': timed_s / timed_epochs if timed_epochs else float('nan'),
    'chunk_epoch_s': [round(s / n, 4) for n, s in chunks],
    'epochs_measured': done,
    'measured_s': measured_s,
    'last_loss': metrics[-1]['loss'],
    'last_aul_auroc': metrics[-1].get('aul_auroc'),
    'profile': profile,
  }


def _busy_us(intervals: list[tuple[float, float]]) -> float:
  """Length of the union of (start, end) intervals: time at least one of them was running."""
  busy, end = 0.0, float('-inf')
  for start, stop in sorted(intervals):
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy


def summarise_trace(trace_dir: str, top: int = 8) -> dict[str, Any]:
  """Per traced process (host, each device): events, their summed and union (busy) time and
  the span from first start to last end, in ms; for devices also the costliest op names.

  busy / span near 1 on a GPU means it was never idle (kernel-bound); much less means it
  waited for launches (latency-bound).
  """
  (path,) = Path(trace_dir).rglob('perfetto_trace.json.gz')
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  names = {e['pid']: e['args']['name'] for e in events if e.get('name') == 'process_name'}
  spans = collections.defaultdict(list)
  cost = collections.defaultdict(collections.Counter)
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e:
      process = names.get(e['pid'], str(e['pid']))
      spans[process].append((e['ts'], e['ts'] + e['dur']))
      if 'device' in process.lower():
        cost[process][e['name'][:80]] += e['dur']
  out = {}
  for process, intervals in spans.items():
    out[process] = {
      'events': len(intervals),
      'sum_ms': round(sum(b - a for a, b in intervals) / 1e3, 2),
      'busy_ms': round(_busy_us(intervals) / 1e3, 2),
      'span_ms': round((max(b for _, b in intervals) - min(a for a, _ in intervals)) / 1e3, 2),
    }
    if cost[process]:
      out[process]['top_ms'] = {k: round(v / 1e3, 2) for k, v in cost[process].most_common(top)}
  return out


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', choices=models.MODELS, default='resnet32')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--num-examples', type=int, default=45_000)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--learning-rate', type=float, default=0.1)
  parser.add_argument('--epochs', type=int, default=5, help='epochs timed after the first')
  parser.add_argument('--target-epochs', type=int, default=150, help='the run to project')
  parser.add_argument('--chunk', type=int, default=10, help='epochs per timed chunk')
  parser.add_argument(
    '--time-limit-s', type=float, default=float('inf'), help='start no chunk after this'
  )
  parser.add_argument('--goal-s', type=float, default=300.0, help='target for the whole run')
  parser.add_argument('--flops-per-image', type=float, default=None)
  parser.add_argument(
    '--xla-flops', action='store_true', help="also count XLA's FLOPs when the table has some"
  )
  parser.add_argument('--matmul-size', type=int, default=None, help='default: 8192, CPU 1024')
  parser.add_argument('--no-augment', action='store_true')
  parser.add_argument('--no-truth', action='store_true', help='no per-epoch AUROC')
  parser.add_argument('--num-devices', type=int, default=1)
  parser.add_argument(
    '--profile', action='store_true', help='trace one more epoch; summarise device busy time'
  )
  parser.add_argument('--quick', action='store_true', help='tiny sizes, for tests')
  args = parser.parse_args(argv)
  if args.quick:
    args.num_examples, args.batch_size, args.epochs, args.chunk = 256, 32, 2, 1
    args.matmul_size = args.matmul_size or 256
  if args.matmul_size is None:
    args.matmul_size = 1024 if jax.default_backend() == 'cpu' else 8192
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  log(f'{jax.devices()[0].device_kind}; measuring matrix-product rates')
  rates = {
    'float32': common.matmul_tflops('float32', size=args.matmul_size),
    'float32_highest': common.matmul_tflops('float32', size=args.matmul_size, precision='highest'),
    'bfloat16': common.matmul_tflops('bfloat16', size=args.matmul_size),
  }
  flops = args.flops_per_image or FLOPS_PER_IMAGE.get(args.model)
  xla_flops = None
  if flops is None or args.xla_flops:
    log('counting FLOPs')
    xla_flops = xla_flops_per_image(args)
    flops = flops or xla_flops
  log('making the data')
  timing = time_run(args)

  steps = retrain.steps_per_epoch(args.num_examples, args.batch_size)
  epoch_s = timing['epoch_s']
  projected_s = timing['first_epoch_s'] + (args.target_epochs - 1) * epoch_s
  floor_s = args.target_epochs * args.num_examples * flops / (rates[args.dtype] * 1e12)
  full = timing['epochs_measured'] >= args.target_epochs
  rows = [
    ['compile + first epoch', f'{timing["first_epoch_s"]:.2f} s'],
    ['later epochs', f'{epoch_s:.3f} s ({epoch_s / steps * 1e3:.3f} ms/step, {steps} steps)'],
    ['compile (first epoch - later)', f'{timing["first_epoch_s"] - epoch_s:.2f} s'],
    [f'{args.target_epochs} epochs, projected', f'{projected_s:.1f} s'],
    [f'{timing["epochs_measured"]} epochs, measured', f'{timing["measured_s"]:.1f} s'],
    [f'FLOP floor at {rates[args.dtype]:.4g} TFLOP/s', f'{floor_s:.1f} s'],
  ]
  print(
    f'{args.model} {args.dtype}, {args.num_examples} examples, batch {args.batch_size}, '
    f'{jax.devices()[0].device_kind}'
  )
  common.print_table(['what', 'time'], rows)
  record = {
    'model': args.model,
    'dtype': args.dtype,
    'num_examples': args.num_examples,
    'batch_size': args.batch_size,
    'steps_per_epoch': steps,
    'augment': not args.no_augment,
    'compile_s': round(timing['first_epoch_s'] - epoch_s, 2),
    'first_epoch_s': round(timing['first_epoch_s'], 3),
    'epoch_s': round(epoch_s, 4),
    'step_ms': round(epoch_s / steps * 1e3, 4),
    'images_per_s': round(args.num_examples / epoch_s, 1),
    'chunk_epoch_s': timing['chunk_epoch_s'],
    'target_epochs': args.target_epochs,
    'projected_s': round(projected_s, 1),
    'epochs_measured': timing['epochs_measured'],
    'measured_s': round(timing['measured_s'], 1),
    'full_run_measured': full,
    'goal_s': args.goal_s,
    'meets_goal': bool((timing['measured_s'] if full else projected_s) <= args.goal_s),
    'flops_per_image': flops,
    'xla_flops_per_image': xla_flops,
    'matmul_tflops': {k: float(f'{v:.4g}') for k, v in rates.items()},
    'floor_rate': args.dtype,
    'floor_s': round(floor_s, 2),
    'over_floor': round(projected_s / floor_s, 1),
    'last_loss': round(timing['last_loss'], 4),
    'last_aul_auroc': timing['last_aul_auroc'],
    'profile': timing['profile'],
    'device_peak_bytes': common.device_peak_bytes(),
    'num_devices': args.num_devices,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'machine': common.machine(),
  }
  common.emit_json(record)
  return record


if __name__ == '__main__':
  main()
