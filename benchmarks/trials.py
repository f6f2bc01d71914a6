"""Several networks in one compiled program against the same networks trained one by one.

For each model and R, times one epoch of R trials in one program (`train.make_train_epoch`
with `trials=R`: the per-device epoch vmapped over R) against one epoch of a single network,
which R sequential runs repeat R times. Both are the library's own compiled epochs, timed
interleaved (round-robin) after warm-up; medians are reported. Images/s counts every trial's
images. `speedup_vs_sequential` = R x (one network's epoch) / (R trials' epoch).

  .venv/bin/python benchmarks/trials.py                        # mlp, lenet, resnet20; R = 1..8
  .venv/bin/python benchmarks/trials.py --models lenet --trials 4 --image-shape 28x28x1

The default data is digits-sized (1,437 random 8x8 grey images, 10 classes, batch 64), the
embedded default's shape; --image-shape 32x32x3 gives CIFAR-sized images.
"""

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from aul_jax import models, train
from benchmarks import common

NUM_CLASSES = 10


class Epochs:
  """A compiled epoch of `trials` networks (0: one network, no trial axis), called repeatedly."""

  def __init__(self, model_name: str, trials: int, args: argparse.Namespace, mesh):
    model = models.get_model(model_name, NUM_CLASSES, bn_axis_name=train.DATA_AXIS)
    n = args.num_examples
    optimizer = train.make_optimizer(
      learning_rate=0.05,
      momentum=0.9,
      weight_decay=1e-4,
      steps_per_epoch=-(-n // args.batch_size),
    )
    init = functools.partial(train.create_train_state, model, optimizer, args.image_shape)
    keys = jnp.stack([jax.random.key(r) for r in range(max(trials, 1))])
    keys = keys if trials else keys[0]
    self.state = train.replicate(train.over_trials(init, trials)(keys), mesh)
    self.aul_state = train.init_aul_state(mesh, n, 1, None, trials=trials)
    rng = np.random.default_rng(0)
    self.data = train.replicate(
      {
        'image': rng.normal(size=(n, *args.image_shape)).astype(np.float32),
        'label': rng.integers(0, NUM_CLASSES, n).astype(np.int32),
        'weight': np.ones(n, np.float32),
      },
      mesh,
    )
    self.key = keys
    self.run_epoch = train.make_train_epoch(
      train.make_step(model, optimizer),
      mesh,
      num_examples=n,
      batch_size=args.batch_size,
      augment_images=False,
      trials=trials,
    )
    self.epoch = 0

  def __call__(self):
    self.state, self.aul_state, stats = self.run_epoch(
      self.state, self.aul_state, self.data, self.key, self.epoch
    )
    self.epoch += 1
    return stats


def measure(model_name: str, args: argparse.Namespace, mesh) -> dict[str, Any]:
  """Epoch seconds of one network and of each R in one program, timed round-robin."""
  runs = {'one': Epochs(model_name, 0, args, mesh)}
  runs.update({f'R={r}': Epochs(model_name, r, args, mesh) for r in args.trials})
  times = common.interleaved_seconds(runs, repeats=args.repeats, warmup=args.warmup)
  one = common.median(times['one'])
  out = {'one_network_epoch_s': round(one, 5), 'by_trials': {}}
  for r in args.trials:
    seconds = common.median(times[f'R={r}'])
    out['by_trials'][str(r)] = {
      'epoch_s': round(seconds, 5),
      'sequential_epoch_s': round(r * one, 5),
      'images_per_s': round(r * args.num_examples / seconds, 1),
      'sequential_images_per_s': round(args.num_examples / one, 1),
      'speedup_vs_sequential': round(r * one / seconds, 3),
    }
  return out


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='mlp,lenet,resnet20')
  parser.add_argument('--trials', default='1,2,4,8', help='R values, comma-separated')
  parser.add_argument('--num-examples', type=int, default=1437)
  parser.add_argument('--image-shape', default='8x8x1', help='HxWxC')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=7, help='timed epochs per variant')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--num-devices', type=int, default=1)
  parser.add_argument('--quick', action='store_true', help='tiny sizes, for tests')
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.trials, args.num_examples, args.repeats = 'mlp,lenet', '1,2', 256, 2
  args.models = args.models.split(',')
  args.trials = [int(r) for r in args.trials.split(',')]
  args.image_shape = tuple(int(d) for d in args.image_shape.lower().split('x'))
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  mesh = train.make_mesh(jax.devices()[: args.num_devices])
  results = {name: measure(name, args, mesh) for name in args.models}
  shape = 'x'.join(map(str, args.image_shape))
  print(f'{args.num_examples} random {shape} images, batch {args.batch_size}, one epoch each')
  rows = [
    [name, r, v['epoch_s'], v['sequential_epoch_s'], v['images_per_s'], v['speedup_vs_sequential']]
    for name, result in results.items()
    for r, v in result['by_trials'].items()
  ]
  common.print_table(
    ['model', 'R', 'R in one program, s', 'R sequential, s', 'images/s', 'speedup'], rows
  )
  record = {
    'models': results,
    'speedup_vs_sequential': {
      name: {r: v['speedup_vs_sequential'] for r, v in result['by_trials'].items()}
      for name, result in results.items()
    },
    'num_examples': args.num_examples,
    'image_shape': list(args.image_shape),
    'batch_size': args.batch_size,
    'repeats': args.repeats,
    'machine': common.machine(),
  }
  common.emit_json(record)
  return record


if __name__ == '__main__':
  main()
