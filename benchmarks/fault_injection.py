"""kill -9 at random times of a run, then one rerun: is scores.csv the uninterrupted run's?

  python benchmarks/fault_injection.py                 # 20 kills of the digits default
  python benchmarks/fault_injection.py --kills 3 --args=--config.aul.epochs=3

Runs the command once uninterrupted (its bytes and its duration T), then `--kills` times:
starts it on a fresh workdir, sends SIGKILL after a uniformly random time in (0, T) (seeded),
reruns it once to the end and compares scores.csv and aul_history.npy with the uninterrupted
bytes. A kill can land anywhere: start-up, an epoch, a checkpoint save, a stage artifact or
the output writes. The table gives each kill's time and the last log line before it.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = ('scores.csv', 'aul_history.npy')


def _command(workdir: str, extra: list[str]) -> list[str]:
  return [sys.executable, 'launch.py', '--config=configs/digits.py', f'--workdir={workdir}', *extra]


def _outputs(workdir: str) -> dict[str, bytes]:
  files = {}
  for name in OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path, 'rb') as f:
        files[name] = f.read()
  return files


def _run(workdir: str, extra: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(_command(workdir, extra), cwd=ROOT, capture_output=True, text=True)


def _killed(workdir: str, extra: list[str], after_s: float) -> tuple[int, str]:
  """Starts the command, SIGKILLs it after `after_s` seconds; (its exit code, last log line)."""
  with tempfile.TemporaryFile('w+') as stderr:
    process = subprocess.Popen(_command(workdir, extra), cwd=ROOT, stderr=stderr, text=True)
    try:
      process.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGKILL)
      process.wait()
    stderr.seek(0)
    lines = [line.strip() for line in stderr.read().splitlines() if line.strip()]
  return process.returncode, (lines[-1] if lines else '(before the first log line)')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument(
    '--quick', action='store_true', help='One kill of a 2-epoch, one-round run (a smoke test).'
  )
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--args', action='append', default=[], help='Extra launch.py flags.')
  flags = parser.parse_args()
  if flags.quick:
    flags.kills = 1
    flags.args += ['--config.aul.epochs=2', '--config.detector.rounds=1']
  root = tempfile.mkdtemp(prefix='aul_faults_')
  try:
    reference = os.path.join(root, 'uninterrupted')
    start = time.perf_counter()
    result = _run(reference, flags.args)
    duration = time.perf_counter() - start
    if result.returncode != 0:
      sys.exit(f'the uninterrupted run failed:\n{result.stderr[-2000:]}')
    expected = _outputs(reference)
    times = np.sort(np.random.default_rng(flags.seed).uniform(0, duration, flags.kills))
    rows, identical = [], 0
    for i, after_s in enumerate(times):
      workdir = os.path.join(root, f'kill{i}')
      code, last_line = _killed(workdir, flags.args, float(after_s))
      rerun = _run(workdir, flags.args)
      same = rerun.returncode == 0 and _outputs(workdir) == expected
      leftovers = [n for n in os.listdir(workdir) if n.startswith('.outputs-')]
      identical += same and not leftovers
      verdict = 'identical' if same and not leftovers else f'DIFFERENT (rerun {rerun.returncode})'
      rows.append(
        [i, f'{after_s:.1f}', 'killed' if code == -9 else f'ended {code}', last_line[9:70], verdict]
      )
      shutil.rmtree(workdir, ignore_errors=True)
    common.print_table(['kill', 'after s', 'process', 'last log line', 'after one rerun'], rows)
    print(f'{identical}/{flags.kills} identical; uninterrupted run {duration:.1f} s')
    common.emit_json(
      {
        'benchmark': 'fault_injection',
        'machine': common.machine(),
        'args': flags.args,
        'kills': flags.kills,
        'identical': int(identical),
        'uninterrupted_s': duration,
        'kill_times_s': [float(t) for t in times],
      }
    )
    if identical != flags.kills:
      sys.exit(1)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
