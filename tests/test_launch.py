"""launch.py as a user runs it: bad input gives a clear error, a non-zero exit, no traceback
and an untouched workdir; a good run writes the documented outputs."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_pipeline import SCORES_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run(
    [sys.executable, 'launch.py', f'--workdir={workdir}', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def _npz(tmp_path, **arrays):
  path = tmp_path / 'data.npz'
  np.savez(path, **arrays)
  return str(path)


def _good_npz_arrays():
  rng = np.random.default_rng(0)
  return {'x_train': rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), 'y_train': np.arange(40) % 4}


BAD_INPUTS = {
  'noise rate above 1': (['--config=configs/digits.py', '--config.noise.rate=1.5'], 'noise.rate'),
  'unknown noise kind': (
    ['--config=configs/digits.py', '--config.noise.kind=gaussian'],
    'gaussian',
  ),
  'unknown model': (
    ['--config=configs/digits.py', '--config.model.name=vgg'],
    "unknown model 'vgg'",
  ),
  'unknown method': (['--config=configs/digits.py', '--config.method=magic'], 'magic'),
  'zero epochs': (['--config=configs/digits.py', '--config.aul.epochs=0'], 'aul.epochs=0'),
  'batch not divisible by devices': (
    ['--config=configs/digits.py', '--config.aul.batch_size=63'],
    'not divisible',
  ),
  'unknown data set': (
    ['--config=configs/digits.py', '--config.data.name=not_a_dataset'],
    'not_a_dataset',
  ),
  'missing npz file': (
    ['--config=configs/npz.py', '--config.data.path=/nonexistent/d.npz'],
    '/nonexistent/d.npz',
  ),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path):
  args, expected = BAD_INPUTS[case]
  workdir = tmp_path / 'run'
  result = launch(*args, workdir=workdir)
  assert result.returncode != 0
  assert expected in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()


def _break(arrays, problem):
  """Returns the npz arrays with one `problem`, and the words the error must contain."""
  if problem == 'missing key':
    del arrays['y_train']
    return arrays, ["'y_train'", 'missing']
  if problem == 'negative label':
    arrays['y_train'] = arrays['y_train'] - 1
    return arrays, ["'y_train'", '-1']
  if problem == 'out-of-range label':
    arrays['y_train'] = arrays['y_train'].astype(np.int64)
    arrays['y_train'][3] = 2**40
    return arrays, ["'y_train'", str(2**40)]
  if problem == 'float labels':
    arrays['y_train'] = arrays['y_train'].astype(np.float32)
    return arrays, ["'y_train'", 'float32']
  if problem == 'nan pixel':
    arrays['x_train'] = arrays['x_train'].astype(np.float32)
    arrays['x_train'][7, 1, 1] = np.nan
    return arrays, ["'x_train'", 'NaN']
  if problem == '1-d images':
    arrays['x_train'] = arrays['x_train'].reshape(40, 64)[:, 0]
    return arrays, ["'x_train'", 'shape (40,)']
  assert problem == 'length mismatch'
  arrays['y_train'] = arrays['y_train'][:-1]
  return arrays, ["'y_train'", '39']


NPZ_PROBLEMS = [
  'missing key',
  'negative label',
  'out-of-range label',
  'float labels',
  'nan pixel',
  '1-d images',
  'length mismatch',
]


@pytest.mark.parametrize('problem', NPZ_PROBLEMS)
def test_bad_npz_names_the_key_and_problem(problem, tmp_path):
  arrays, expected = _break(_good_npz_arrays(), problem)
  path = _npz(tmp_path, **arrays)
  workdir = tmp_path / 'run'
  result = launch('--config=configs/npz.py', f'--config.data.path={path}', workdir=workdir)
  assert result.returncode == 2
  assert path in result.stderr, result.stderr
  for words in expected:
    assert words in result.stderr, (words, result.stderr)
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()


def test_unwritable_workdir_is_refused(tmp_path):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o500)
  if os.access(locked, os.W_OK):
    pytest.skip('running as a user that can write anywhere (root)')
  result = launch('--config=configs/digits.py', workdir=locked / 'run')
  assert result.returncode == 2 and 'not writable' in result.stderr


def test_npz_run_writes_documented_outputs(tmp_path):
  path = _npz(tmp_path, **_good_npz_arrays())
  workdir = tmp_path / 'run'
  result = launch(
    '--config=configs/npz.py',
    f'--config.data.path={path}',
    '--config.aul.epochs=2',
    '--config.aul.batch_size=16',
    workdir=workdir,
  )
  assert result.returncode == 0, result.stderr
  with open(workdir / 'scores.csv') as f:
    rows = list(csv.DictReader(f))
  round2 = tuple(f'round2_{name}' for name in SCORES_COLUMNS[2:10])
  assert tuple(rows[0]) == (*SCORES_COLUMNS, 'left_out', *round2)  # Two detection rounds.
  assert [int(r['index']) for r in rows] == list(range(40))
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['n_train'] == 40 and 0 <= summary['noise_estimate'] <= 1
  assert 'auroc' not in summary  # No injected noise, no truth to score against.


def test_workdir_under_a_file_is_refused(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  result = launch('--config=configs/digits.py', workdir=blocker / 'run')
  assert result.returncode == 2 and 'not a directory' in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr
