"""aul_jax.gmm against scikit-learn: 2-component EM on 1-D scores, same start, same iterations.

Run from the repository root:
  .venv/bin/python benchmarks/gmm_vs_sklearn.py                      (~5 min on 2 cores)
  .venv/bin/python benchmarks/gmm_vs_sklearn.py --sizes 1e5 1e6     (~1 min)
  .venv/bin/python benchmarks/gmm_vs_sklearn.py --quick             (seconds; for tests)

For each N: scikit-learn's float64 EM (its float32 path is inaccurate) and aul_jax.gmm.fit
on float32 and on float64 (x64) input, all from the same start, K = 2, 100 iterations, tol =
0. Prints the time of each, the speed ratio, the largest relative parameter difference to
scikit-learn, and the JAX time against two floors: a memory-read floor (the faster of 100
jnp.sum reads of the float32 array dispatched eagerly and 100 reads chained in one jitted
loop) and a compute floor (100 fused passes of sum(sigmoid(quadratic(x))), the one exp per
sample that any exact EM step needs). The last line is one JSON object with the headline
figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import sklearn
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkMixture

from aul_jax import gmm

ITERATIONS = 100


def scores(n: int, seed: int = 0) -> np.ndarray:
  """AUL-like scores: 70% clean around 1.0, 30% mislabeled around 3.0 (float64)."""
  rng = np.random.default_rng(seed)
  mislabeled = rng.random(n) < 0.3
  return np.where(mislabeled, rng.normal(3.0, 0.6, n), rng.normal(1.0, 0.3, n))


def start(x: np.ndarray) -> gmm.GaussianMixture:
  """The shared starting point: quartile means, equal weights, the data variance."""
  means = np.quantile(x, [0.25, 0.75])
  return gmm.GaussianMixture(np.full(2, 0.5), means, np.full(2, x.var()), 0.0, 0, False)


def best_time(fn, repeats: int) -> tuple[float, object]:
  """The fastest of `repeats` timed calls (after one untimed warm-up call) and its result."""
  result = jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(repeats):
    begin = time.perf_counter()
    result = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - begin)
  return best, result


def read_floor(x32: jax.Array, repeats: int) -> tuple[float, str]:
  """Seconds to read x32 100 times: the faster of eager jnp.sum calls and a jitted loop."""
  total = jax.jit(jnp.sum)

  def eager():
    return [total(x32) for _ in range(ITERATIONS)][-1]

  @jax.jit
  def chained(x):
    return jax.lax.fori_loop(0, ITERATIONS, lambda i, acc: acc + jnp.sum(x * (1 + acc * 0)), 0.0)

  eager_s = best_time(eager, repeats)[0]
  chained_s = best_time(lambda: chained(x32), repeats)[0]
  return (eager_s, 'eager jnp.sum x100') if eager_s <= chained_s else (chained_s, 'jitted loop')


def sigmoid_floor(x32: jax.Array, repeats: int) -> float:
  """Seconds for 100 fused passes of sum(sigmoid(quadratic(x))): the least work per EM step.

  Any exact EM iteration evaluates one exp per sample; this pass does only that (one
  reduction, so XLA fuses it completely), so it bounds what an XLA EM step can cost.
  """

  @jax.jit
  def passes(x):
    step = lambda i, acc: acc + jnp.sum(jax.nn.sigmoid((0.3 * x - 0.2 - acc * 1e-30) * x + 0.1))
    return jax.lax.fori_loop(0, ITERATIONS, step, 0.0)

  return best_time(lambda: passes(x32), repeats)[0]


def sklearn_fit(x: np.ndarray, init: gmm.GaussianMixture) -> tuple[float, SkMixture]:
  """One timed scikit-learn float64 fit from `init` (too slow to repeat at N = 1e7)."""
  sk = SkMixture(
    2,
    covariance_type='diag',
    max_iter=ITERATIONS,
    tol=0.0,
    init_params='random_from_data',  # overridden by the three *_init arrays; cheapest
    weights_init=init.weights,
    means_init=init.means[:, None],
    precisions_init=1 / init.variances[:, None],
  )
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    begin = time.perf_counter()
    sk.fit(x[:, None])
    return time.perf_counter() - begin, sk


def largest_difference(fit: gmm.GaussianMixture, sk: SkMixture) -> float:
  """Largest relative difference of weights, means and variances to scikit-learn's."""
  pairs = [
    (fit.weights, sk.weights_),
    (fit.means, sk.means_[:, 0]),
    (fit.variances, sk.covariances_[:, 0]),
  ]
  return max(float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b))) for a, b in pairs)


def machine() -> dict:
  """nproc, CPU model and software versions, for the record."""
  model = platform.processor()
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    model = next(
      line.split(':', 1)[1].strip() for line in lscpu.splitlines() if 'Model name' in line
    )
  except (OSError, subprocess.CalledProcessError, StopIteration):
    pass
  return {
    'nproc': os.cpu_count(),
    'cpu': model,
    'load_avg_1m': round(os.getloadavg()[0], 2),
    'jax': jax.__version__,
    'sklearn': sklearn.__version__,
    'backend': jax.default_backend(),
  }


def run_one(n: int, repeats: int) -> dict:
  """All measurements for one N."""
  x = scores(n)
  init = start(x)
  x32 = jnp.asarray(x, jnp.float32)
  fit = lambda x: gmm.fit(x, init=init, max_iter=ITERATIONS, tol=0.0)
  jax_s, fit32 = best_time(lambda: fit(x32), repeats)
  with jax.enable_x64(True):
    fit64 = jax.tree.map(np.asarray, fit(jnp.asarray(x, jnp.float64)))
  floor_s, floor_how = read_floor(x32, repeats)
  sigmoid_s = sigmoid_floor(x32, repeats)
  sklearn_s, sk = sklearn_fit(x, init)
  assert int(fit32.n_iter) == sk.n_iter_ == ITERATIONS
  return {
    'n': n,
    'sklearn_float64_s': round(sklearn_s, 4),
    'jax_float32_s': round(jax_s, 5),
    'speedup': round(sklearn_s / jax_s, 1),
    'read_floor_s': round(floor_s, 5),
    'read_floor_method': floor_how,
    'jax_over_floor': round(jax_s / floor_s, 2),
    'sigmoid_pass_floor_s': round(sigmoid_s, 5),
    'jax_over_sigmoid_floor': round(jax_s / sigmoid_s, 2),
    'max_rel_param_diff_float32': float(f'{largest_difference(fit32, sk):.2e}'),
    'max_rel_param_diff_float64': float(f'{largest_difference(fit64, sk):.2e}'),
    'log_likelihood_diff_float32': float(
      f'{abs(float(fit32.log_likelihood) - sk.score(x[:, None])):.2e}'
    ),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', nargs='+', type=float, default=[1e5, 1e6, 1e7])
  parser.add_argument('--repeats', type=int, default=7, help='timed JAX calls per N (best kept)')
  parser.add_argument('--quick', action='store_true', help='N = 2e4 only, one repeat (tests)')
  args = parser.parse_args()
  if args.quick:
    args.sizes, args.repeats = [2e4], 1
  info = machine()
  print(f'# {info}')
  header = (
    f'{"N":>9} {"sklearn f64":>12} {"jax f32":>9} {"speedup":>8} {"floor":>8} '
    f'{"jax/floor":>9} {"sigmoid":>8} {"jax/sigm":>8} {"diff f32":>9} {"diff f64":>9}'
  )
  print(header)
  results = []
  for n in (int(s) for s in args.sizes):
    row = run_one(n, args.repeats if n < 10**7 else max(1, args.repeats - 2))
    results.append(row)
    print(
      f'{n:>9} {row["sklearn_float64_s"]:>11.3f}s {row["jax_float32_s"]:>8.4f}s '
      f'{row["speedup"]:>7.0f}x {row["read_floor_s"]:>7.4f}s {row["jax_over_floor"]:>8.1f}x '
      f'{row["sigmoid_pass_floor_s"]:>7.4f}s {row["jax_over_sigmoid_floor"]:>7.1f}x '
      f'{row["max_rel_param_diff_float32"]:>9.1e} {row["max_rel_param_diff_float64"]:>9.1e}',
      flush=True,
    )
  by_n = {row['n']: row for row in results}
  headline = {
    'benchmark': 'aul_jax.gmm vs sklearn GaussianMixture, K=2, 1-D, 100 iterations, tol=0',
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'machine': info | {'load_avg_1m_end': round(os.getloadavg()[0], 2)},
    'speedup_at_1e6': by_n.get(10**6, {}).get('speedup'),
    'jax_over_read_floor_at_1e7': by_n.get(10**7, {}).get('jax_over_floor'),
    'jax_over_sigmoid_pass_floor_at_1e7': by_n.get(10**7, {}).get('jax_over_sigmoid_floor'),
    'max_rel_param_diff_float32': max(row['max_rel_param_diff_float32'] for row in results),
    'results': results,
  }
  print(json.dumps(headline))


if __name__ == '__main__':
  main()
