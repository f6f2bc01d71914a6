"""Shared helpers of the benchmark scripts: timing, the machine's description, table and JSON.

Every script prints a readable table and ends with exactly one JSON line (`emit_json`), so a
caller can read the result with `json.loads(output.splitlines()[-1])`.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
  """Wall-clock seconds of `repeats` calls of `fn` (each blocked until ready), after `warmup`."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def interleaved_seconds(
  runs: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int
) -> dict[str, list[float]]:
  """Seconds of `repeats` calls of each run, after `warmup` calls each, taken round-robin
  (one call of every run per round), so a change of load hits every run alike."""
  for run in runs.values():
    median_seconds(run, repeats=0, warmup=warmup)
  times: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      times[name] += median_seconds(run, repeats=1, warmup=0)
  return times


def median(values: Sequence[float]) -> float:
  return float(statistics.median(values))


def cpu_model() -> str:
  """The CPU's model name as `lscpu` reports it (falls back to /proc/cpuinfo, then platform)."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10, check=False).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def machine() -> dict[str, Any]:
  """Where and when a figure was measured: CPU, cores, load, accelerator, versions, date."""
  device = jax.devices()[0]
  return {
    'nproc': os.cpu_count(),
    'cpu': cpu_model(),
    'loadavg_1m': round(os.getloadavg()[0], 2),
    'backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'jax': jax.__version__,
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ'),
  }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """A plain left-aligned text table."""
  cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  for n, row in enumerate(cells):
    print('  '.join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if n == 0:
      print('  '.join('-' * w for w in widths))


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4g}' if abs(value) < 1e4 else f'{value:.0f}'
  return str(value)


def emit_json(record: dict[str, Any]) -> None:
  """The last line of every benchmark's output: one JSON object."""
  print(json.dumps(record, sort_keys=False), flush=True)


def compiled_memory(compiled: Any) -> dict[str, int] | None:
  """Buffer sizes, in bytes, from a compiled executable's memory analysis (None if unknown).

  `peak_bytes` is what the executable needs besides its code: arguments + outputs + temporaries,
  less what donation lets outputs share with arguments (XLA's `alias_size_in_bytes`).
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # Some backends or versions do not implement it.
    return None
  if stats is None:
    return None
  fields = {
    'argument_bytes': 'argument_size_in_bytes',
    'output_bytes': 'output_size_in_bytes',
    'temp_bytes': 'temp_size_in_bytes',
    'alias_bytes': 'alias_size_in_bytes',
  }
  out = {k: int(getattr(stats, v, 0) or 0) for k, v in fields.items()}
  out['peak_bytes'] = (
    out['argument_bytes'] + out['output_bytes'] + out['temp_bytes'] - out['alias_bytes']
  )
  return out


def device_peak_bytes() -> int | None:
  """The device allocator's peak since start-up, where the backend reports it (GPU/TPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  if not stats:
    return None
  return int(stats.get('peak_bytes_in_use', 0)) or None


def matmul_tflops(
  dtype: str, *, size: int, repeats: int = 10, precision: str | None = None
) -> float:
  """Measured dense matrix-product rate, in TFLOP/s, of a size^3 product on the default device.

  The compute ceiling that a run's FLOP floor is measured against. Random operands (not
  zeros, which some GPUs multiply faster); `repeats` products dispatched back to back after
  a warm-up, timed to the last one's completion. `precision` is lax's ('highest' for true
  float32; None is the backend's default, TF32 for float32 on recent NVIDIA GPUs).
  """
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (size, size), jnp.dtype(dtype))
  y = jax.random.normal(ky, (size, size), jnp.dtype(dtype))
  product = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
  jax.block_until_ready(product(x, y))
  start = time.perf_counter()
  out = [product(x, y) for _ in range(repeats)]
  jax.block_until_ready(out)
  return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12
