"""The benchmark scripts run with --quick and end with one JSON line of sane numbers; the
convolution VJPs tried in train_throughput.py give lax's gradients."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from benchmarks import train_throughput
from tests import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script, *args):
  """Runs benchmarks/`script` --quick as a user would; returns (stdout, the last line's JSON)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags())
  result = subprocess.run(
    [sys.executable, os.path.join('benchmarks', script), '--quick', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) > 1, 'expected a table before the JSON line'
  return result.stdout, json.loads(lines[-1])


def positive(x):
  return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_train_throughput_quick_without_torch():
  out, record = run_benchmark('train_throughput.py', '--model', 'lenet', '--no-torch')
  assert record['model'] == 'lenet'
  assert positive(record['images_per_s'])
  assert record['torch_images_per_s'] is None and record['ratio_vs_torch'] is None
  assert record['torch'].startswith('skipped')
  assert 'PyTorch side skipped' in out
  assert record['machine']['nproc'] >= 1 and record['machine']['jax'] == jax.__version__


def test_train_throughput_quick_against_torch_in_each_dtype():
  pytest.importorskip('torch')
  _, record = run_benchmark(
    'train_throughput.py', '--model', 'mlp', '--dtype', 'float32,bfloat16', '--torch-threads', '1'
  )
  # Without a GPU (JAX_PLATFORMS=cpu here, and CI has none) torch runs on the CPU too.
  assert record['torch_device'] in ('cpu', 'cuda')
  assert set(record['torch_images_per_s_by_side']) == {
    'nchw',
    'channels_last',
    'nchw_bfloat16',
    'channels_last_bfloat16',
  }
  assert set(record['ratio_vs_torch_by_variant']) == {'library_float32', 'library_bfloat16'}
  assert all(positive(r) for r in record['ratio_vs_torch_by_variant'].values())
  assert record['ratio_vs_torch'] == record['ratio_vs_torch_by_variant']['library_float32']


def test_aul_run_time_quick():
  out, record = run_benchmark('aul_run_time.py', '--model', 'lenet')
  for key in ('compile_s', 'first_epoch_s', 'epoch_s', 'projected_s', 'measured_s', 'floor_s'):
    assert math.isfinite(record[key]), key
  for key in ('first_epoch_s', 'epoch_s', 'step_ms', 'projected_s', 'floor_s', 'flops_per_image'):
    assert positive(record[key]), key
  assert record['epochs_measured'] == 3 and record['full_run_measured'] is False
  assert record['steps_per_epoch'] == 8 and record['augment'] is True
  assert record['projected_s'] > record['first_epoch_s']
  assert record['flops_per_image'] == record['xla_flops_per_image']  # No table entry for lenet.
  assert all(positive(r) for r in record['matmul_tflops'].values())
  assert 0 <= record['last_aul_auroc'] <= 1 and math.isfinite(record['last_loss'])
  assert 'projected' in out and 'FLOP floor' in out


def test_aul_overhead_quick():
  _, record = run_benchmark('aul_overhead.py')
  keys = ('overhead', 'aul_only_overhead', 'history_float32_overhead', 'history_bfloat16_overhead')
  for key in keys:
    assert math.isfinite(record[key]) and record[key] > -1, key
  assert all(positive(s) for s in record['epoch_s'].values())
  n, t = record['num_examples'], record['history_epochs']
  with_dynamics = 4 * n * 10 + 4  # The AUL, 9 dynamics vectors and an int32 epoch count.
  assert record['aul_state_bytes'] == {
    'no_aul': 0,
    'aul_only': 4 * n,
    'aul': with_dynamics,
    # With a history the state also keeps the epoch's (N,) losses, its next column.
    'aul_history_float32': with_dynamics + 4 * n * t + 4 * n,
    'aul_history_bfloat16': with_dynamics + 2 * n * t + 4 * n,
  }
  peak = {mode: memory['peak_bytes'] for mode, memory in record['memory'].items()}
  assert all(positive(p) for p in peak.values())
  assert peak['no_aul'] < peak['aul_only'] < peak['aul'] < peak['aul_history_bfloat16']
  assert peak['aul_history_bfloat16'] < peak['aul_history_float32']
  update = record['history_update']
  assert set(update) == {f'{d}_{f}' for d in ('float32', 'bfloat16') for f in ('library', 'rows')}
  assert all(positive(v['ms']) for v in update.values())
  assert update['bfloat16_library']['temp_bytes'] == 0  # The history's column is set in place.


def test_epoch_dispatch_quick():
  _, record = run_benchmark('epoch_dispatch.py')
  for key in ('scan_epoch_s', 'python_loop_epoch_s', 'speedup'):
    assert positive(record[key]), key
  assert record['same_result'] is True


CONV_CASES = {
  '3x3 stride 1': ((4, 8, 8, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),
  '3x3 stride 2': ((4, 8, 8, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1))),
  '5x5 SAME': ((3, 8, 8, 1), (5, 5, 1, 6), (1, 1), 'SAME'),
  '3x3 stride 2 SAME odd': ((2, 7, 9, 3), (3, 3, 3, 4), (2, 2), 'SAME'),
  '1x1 stride 2 VALID': ((2, 6, 6, 3), (1, 1, 3, 4), (2, 2), 'VALID'),
}


def _grads(conv, x, w, strides, padding, dy):
  loss = lambda x, w: jnp.sum(conv(x, w, strides, padding, dimension_numbers=NHWC) * dy)
  return jax.grad(loss, argnums=(0, 1))(x, w)


NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('weight_grad', ['canonical', 'im2col'])
@pytest.mark.parametrize('case', list(CONV_CASES))
def test_custom_conv_vjp_matches_lax(case, weight_grad):
  x_shape, w_shape, strides, padding = CONV_CASES[case]
  conv = train_throughput.make_conv_general_dilated(
    getattr(train_throughput, f'weight_grad_{weight_grad}')
  )
  kx, kw, ky = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  y = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  dy = jax.random.normal(ky, y.shape)
  np.testing.assert_allclose(conv(x, w, strides, padding, dimension_numbers=NHWC), y, rtol=1e-5)
  for got, want in zip(
    _grads(conv, x, w, strides, padding, dy),
    _grads(lax.conv_general_dilated, x, w, strides, padding, dy),
    strict=True,
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_canonical_conv_vjp_under_shard_map_sums_weight_gradients():
  # Replicated weights, batch split over 2 devices: the weight gradient must be the psum.
  mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])
  conv = train_throughput.make_conv_general_dilated(train_throughput.weight_grad_canonical)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P('data')))
  w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))

  def grad_fn(conv_fn):
    def per_device(x, w):
      loss = lambda w: jnp.sum(conv_fn(x, w, (1, 1), 'SAME', dimension_numbers=NHWC) ** 2)
      return jax.grad(loss)(w)

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P()), out_specs=P()))

  np.testing.assert_allclose(
    grad_fn(conv)(x, w), grad_fn(lax.conv_general_dilated)(x, w), rtol=1e-4, atol=1e-4
  )


def test_conv_layers_quick_without_torch():
  out, record = run_benchmark('conv_layers.py', '--no-torch')
  assert len(record['layers_ms']) == 5
  assert set(record['total_ms']) == {
    f'{i}_{k}' for i in ('onednn', 'xla') for k in ('fwd', 'fwd_bwd')
  }
  assert all(positive(ms) for ms in record['total_ms'].values())
  assert positive(record['fwd_bwd_speedup_vs_xla'])
  assert record['fwd_bwd_ratio_vs_torch'] is None and record['torch'] == 'skipped'
  assert 'onednn_fwd_bwd' in out

  trials = record['trials_fwd_bwd']
  assert {k for k in trials if k.startswith('batch')} == {'batch4_R1', 'batch4_R2'}
  assert all(positive(ms) for ms in trials['batch4_R2']['ms'].values())
  assert positive(trials['batch4_R2']['sequential_vs_onednn'])
  assert 'sequential/onednn' in out


def test_trials_quick():
  _, record = run_benchmark('trials.py')
  assert set(record['speedup_vs_sequential']) == {'mlp', 'lenet'}
  for name, by_trials in record['models'].items():
    assert positive(by_trials['one_network_epoch_s']), name
    for r, row in by_trials['by_trials'].items():
      assert positive(row['speedup_vs_sequential']) and positive(row['images_per_s']), (name, r)
      assert row['sequential_epoch_s'] == pytest.approx(
        int(r) * by_trials['one_network_epoch_s'], rel=1e-3
      )


def test_per_example_memory_quick():
  out, record = run_benchmark('per_example_memory.py')
  rows = {row['devices']: row for row in record['by_devices']}
  assert set(rows) == {1, 2, 4} and record['num_examples'] == 4099
  # Each device holds only its ceil(N / devices) rows: 40 bytes each, plus the scalars.
  assert [rows[d]['rows_per_device'] for d in (1, 2, 4)] == [4099, 2050, 1025]
  for row in rows.values():
    assert row['state_bytes_per_row'] == 40
    assert 0 < row['state_bytes_per_device'] - 40 * row['rows_per_device'] <= 16
  assert record['bytes_per_example_per_device'] == 40
  assert record['projected_bytes_per_device']['100M']['8_devices'] == 40 * 12_500_000
  assert 'projected per device' in out


def test_fault_injection_quick():
  out, record = run_benchmark('fault_injection.py')
  assert record['kills'] == 1 and record['identical'] == 1
  assert 0 <= record['kill_times_s'][0] <= record['uninterrupted_s']
  assert '1/1 identical' in out
