"""launch.py as a user runs it: bad input gives a clear error, a non-zero exit, no traceback
and an untouched workdir; a good run writes the documented outputs.

Most cases run launch.py's parser and `launch.run` in this process (`launch_here`): a
subprocess per case cost ~5 s of start-up each. `launch` runs the real command, for the
cases that need a process of their own.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

import launch as launch_script
from aul_jax import cli
from tests import xla_flags
from tests.test_pipeline import SCORES_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(devices=2))
  return subprocess.run(
    [sys.executable, 'launch.py', f'--workdir={workdir}', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.fixture
def launch_here(monkeypatch, capsys):
  """`launch_here(*args, workdir=...)` -> (exit code, stderr), as launch.py would end."""
  monkeypatch.chdir(ROOT)

  def run(*args, workdir):
    values = flags.FlagValues()
    launch_script.define_flags(values)
    argv = ['launch.py', f'--workdir={workdir}', *args]
    monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads its overrides from sys.argv.
    monkeypatch.delitem(sys.modules, 'config_config', raising=False)
    capsys.readouterr()
    try:
      cli.parse_flags(argv, values)
    except SystemExit as exit_info:
      return exit_info.code, capsys.readouterr().err
    code = launch_script.run(values.config, values.workdir, values.force)
    return code, capsys.readouterr().err

  return run


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
  'nan weight decay': (
    ['--config=configs/digits.py', '--config.aul.weight_decay=nan'],
    'aul.weight_decay=nan; expected a finite number >= 0',
  ),
  'more devices than there are': (
    ['--config=configs/digits.py', '--config.num_devices=5'],
    'num_devices=5, but this machine has only 4 device(s)',
  ),
  'unknown detector rule': (
    ['--config=configs/digits.py', '--config.detector.rule=vote'],
    "detector.rule='vote'",
  ),
  'no mixture restarts': (
    ['--config=configs/digits.py', '--config.gmm.n_init=0'],
    'gmm.n_init=0; expected an integer >= 1',
  ),
  'nan mixture tolerance': (['--config=configs/digits.py', '--config.gmm.tol=nan'], 'gmm.tol'),
  'three rounds': (
    ['--config=configs/digits.py', '--config.detector.rounds=3'],
    'detector.rounds=3; expected 1 or 2',
  ),
  'override of no field': (
    ['--config=configs/digits.py', '--config.aull.epochs=3'],
    '--config.aull.epochs: no such config field; did you mean aul?',
  ),
  'value of the wrong type': (
    ['--config=configs/digits.py', '--config.aul.epochs=abc'],
    '--config.aul.epochs=abc: expected an integer',
  ),
  'missing npz file': (
    ['--config=configs/npz.py', '--config.data.path=/nonexistent/d.npz'],
    '/nonexistent/d.npz',
  ),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, launch_here):
  args, expected = BAD_INPUTS[case]
  workdir = tmp_path / 'run'
  code, stderr = launch_here(*args, workdir=workdir)
  assert code == 2
  assert stderr.startswith('error: ') and expected in stderr, stderr
  assert len(stderr.strip().splitlines()) == 1
  assert not workdir.exists()


def test_a_mistyped_override_is_one_line_from_the_real_command(tmp_path):
  result = launch('--config=configs/digits.py', '--config.aul.epoch=3', workdir=tmp_path / 'run')
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert (
    lines[0].startswith('error: --config.aul.epoch: ') and 'did you mean aul.epochs?' in lines[0]
  )
  assert not (tmp_path / 'run').exists()


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
def test_bad_npz_names_the_key_and_problem(problem, tmp_path, launch_here):
  arrays, expected = _break(_good_npz_arrays(), problem)
  path = _npz(tmp_path, **arrays)
  workdir = tmp_path / 'run'
  code, stderr = launch_here(
    '--config=configs/npz.py', f'--config.data.path={path}', workdir=workdir
  )
  assert code == 2
  assert path in stderr, stderr
  for words in expected:
    assert words in stderr, (words, stderr)
  assert len(stderr.strip().splitlines()) == 1
  assert not workdir.exists()


def test_unwritable_workdir_is_refused(tmp_path, launch_here):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o500)
  if os.access(locked, os.W_OK):
    pytest.skip('running as a user that can write anywhere (root)')
  code, stderr = launch_here('--config=configs/digits.py', workdir=locked / 'run')
  assert code == 2 and 'not writable' in stderr


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
  round2 = tuple(f'round2_{name}' for name in SCORES_COLUMNS[2:11])
  assert tuple(rows[0]) == (*SCORES_COLUMNS, 'left_out', *round2)  # Two detection rounds.
  assert [int(r['index']) for r in rows] == list(range(40))
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['n_train'] == 40 and 0 <= summary['noise_estimate'] <= 1
  assert 'auroc' not in summary  # No injected noise, no truth to score against.


def test_workdir_under_a_file_is_refused(tmp_path, launch_here):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  code, stderr = launch_here('--config=configs/digits.py', workdir=blocker / 'run')
  assert code == 2 and 'not a directory' in stderr, stderr
