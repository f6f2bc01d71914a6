"""Per-device memory of the per-example state, split over the data axis, on 1, 2 and 4 devices.

The AUL state (the AUL and the nine dynamics accumulators, `train.init_aul_state`) is
measured from the bytes each device actually holds (its addressable shards). Each step
folds its examples into their rows of the state directly (`aul.add_rows`), so an epoch
keeps no (N, Q) values; the compiled epoch's temporary bytes per device
(`compiled.memory_analysis()`, an MLP on 8x8 images) are reported beside the state. The
state's bytes per example row project the per-device bytes for N = 1.28M (ImageNet) and
N = 100M examples.

  .venv/bin/python benchmarks/per_example_memory.py            # N = 262,144 on 1, 2, 4 devices
  .venv/bin/python benchmarks/per_example_memory.py --devices 1,8 --num-examples 1000000

Host devices stand in for accelerators (`--xla_force_host_platform_device_count`, set here
unless XLA_FLAGS already is); the bytes are the same on any backend.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
  ).strip()

import jax
import numpy as np

from aul_jax import models, train
from benchmarks import common

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
PROJECTED = {'imagenet_1.28M': 1_281_167, '100M': 100_000_000}
PROJECTED_DEVICES = (8, 64, 256)


def device0_bytes(arrays) -> int:
  """Bytes of `arrays` that the first device holds."""
  first = jax.devices()[0]
  return sum(
    shard.data.nbytes for a in arrays for shard in a.addressable_shards if shard.device == first
  )


def measure(num_examples: int, num_devices: int, batch_size: int) -> dict:
  mesh = train.make_mesh(jax.devices()[:num_devices])
  aul_state = train.init_aul_state(mesh, num_examples, 1, None)
  model = models.get_model('mlp', NUM_CLASSES, bn_axis_name=train.DATA_AXIS)
  optimizer = train.make_optimizer(
    learning_rate=0.1, momentum=0.9, weight_decay=0.0, steps_per_epoch=1
  )
  state = train.replicate(
    train.create_train_state(model, optimizer, IMAGE_SHAPE, jax.random.key(0)), mesh
  )
  data = train.replicate(
    {
      'image': np.zeros((num_examples, *IMAGE_SHAPE), np.float32),
      'label': np.zeros(num_examples, np.int32),
      'weight': np.ones(num_examples, np.float32),
    },
    mesh,
  )
  run_epoch = train.make_train_epoch(
    train.make_step(model, optimizer),
    mesh,
    num_examples=num_examples,
    batch_size=batch_size,
    augment_images=False,
  )
  compiled = run_epoch.lower(state, aul_state, data, jax.random.key(1), 0).compile()
  memory = common.compiled_memory(compiled) or {}
  rows = train.rows_per_device(num_examples, mesh)
  leaves = jax.tree.leaves(aul_state)
  per_example = [a for a in leaves if a.ndim > 0]  # The rest are per-run scalars.
  return {
    'devices': num_devices,
    'rows_per_device': rows,
    'state_bytes_per_device': device0_bytes(leaves),
    'state_bytes_per_row': device0_bytes(per_example) / rows,
    'epoch_temp_bytes_per_device': memory.get('temp_bytes'),
  }


def project(state_bytes_per_row: float) -> dict:
  """Per-device bytes of the per-example state at the PROJECTED sizes."""
  return {
    name: {
      f'{devices}_devices': int(-(-n // devices) * state_bytes_per_row)
      for devices in PROJECTED_DEVICES
    }
    for name, n in PROJECTED.items()
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num-examples', type=int, default=262_144)
  parser.add_argument('--devices', default='1,2,4', help='comma-separated device counts')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--quick', action='store_true', help='N = 4,099 (for the tests)')
  args = parser.parse_args()
  num_examples = 4_099 if args.quick else args.num_examples
  counts = [int(d) for d in args.devices.split(',')]
  if max(counts) > jax.device_count():
    parser.error(f'--devices asks for {max(counts)} devices; this process has {jax.device_count()}')
  rows = [measure(num_examples, d, args.batch_size) for d in counts]
  print(f'per-example state on the data axis, N = {num_examples:,}')
  common.print_table(
    ['devices', 'rows per device', 'state B/device', 'state B/row', 'epoch temp B/device'],
    [
      [
        r['devices'],
        r['rows_per_device'],
        r['state_bytes_per_device'],
        r['state_bytes_per_row'],
        r['epoch_temp_bytes_per_device'],
      ]
      for r in rows
    ],
  )
  per_row = rows[0]['state_bytes_per_row']
  projected = project(per_row)
  print(f'projected per device ({per_row:g} B per example row):')
  for name, by_devices in projected.items():
    print(f'  {name}: ' + ', '.join(f'{k} {v / 2**20:,.1f} MiB' for k, v in by_devices.items()))
  common.emit_json(
    {
      'benchmark': 'per_example_memory',
      'num_examples': num_examples,
      'by_devices': rows,
      'bytes_per_example_per_device': per_row,
      'projected_bytes_per_device': projected,
      'machine': common.machine(),
    }
  )


if __name__ == '__main__':
  main()
