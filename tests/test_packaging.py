"""Packaging: the metadata, the wheel and its commands run outside the repo, and a clean ruff
tree."""

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import numpy as np
import pytest

from tests import xla_flags

# The wheel is built once, for both of its tests: one pytest-xdist worker runs them.
pytestmark = pytest.mark.xdist_group('packaging')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_is_typed():
  assert importlib.resources.files('aul_jax').joinpath('py.typed').is_file()


def test_pyproject_declares_the_runtime_dependencies():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  names = {d.split('>')[0].split('=')[0].strip() for d in project['dependencies']}
  assert {'jax', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections'} <= names


@pytest.mark.skipif(
  shutil.which('ruff') is None and not os.path.exists(os.path.join(ROOT, '.venv/bin/ruff')),
  reason='ruff is not installed',
)
def test_tree_is_clean_under_ruff():
  ruff = shutil.which('ruff') or os.path.join(ROOT, '.venv/bin/ruff')
  result = subprocess.run([ruff, 'check', '.'], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """The wheel built from this tree, installed (without dependencies) into a folder of its own,
  and an environment that imports it from there, not from the repo."""
  tmp = tmp_path_factory.mktemp('wheel')
  source = tmp / 'source'  # A copy, so the build leaves nothing in the repo.
  for folder in ('aul_jax', 'configs'):
    ignore = shutil.ignore_patterns('__pycache__', '*.so')
    shutil.copytree(os.path.join(ROOT, folder), source / folder, ignore=ignore)
  shutil.copy(os.path.join(ROOT, 'pyproject.toml'), source)
  build = [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q']
  subprocess.run([*build, '-w', str(tmp / 'dist'), str(source)], check=True, capture_output=True)
  (wheel,) = (tmp / 'dist').iterdir()
  target = tmp / 'site'
  install = [sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target)]
  subprocess.run([*install, str(wheel)], check=True, capture_output=True)
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags())
  return wheel, target, env


def test_the_wheel_holds_the_package_its_configs_and_console_scripts(installed):
  wheel, target, _ = installed
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
  assert {'aul_jax/configs/digits.py', 'aul_jax/configs/npz.py', 'aul_jax/py.typed'} <= names
  assert 'aul_jax/models/onednn_conv.cc' in names
  assert not any(n.startswith(('tests/', 'benchmarks/', 'experiments/')) for n in names)
  assert (target / 'bin' / 'aul-jax').exists() and (target / 'bin' / 'aul-jax-score').exists()


def test_the_installed_commands_run_outside_the_repo(installed, tmp_path):
  _, target, env = installed
  run = lambda *command: subprocess.run(
    command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
  )
  result = run(
    sys.executable,
    str(target / 'bin' / 'aul-jax'),
    '--config=digits',
    f'--workdir={tmp_path}/run',
    '--config.aul.epochs=2',
    '--config.detector.rounds=1',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert summary['n_train'] == 1437 and 0 < summary['noise_estimate'] < 1
  losses = np.random.default_rng(0).gamma(2.0, size=(50, 3))
  np.save(tmp_path / 'losses.npy', losses)
  result = run(
    sys.executable,
    str(target / 'bin' / 'aul-jax-score'),
    f'--losses={tmp_path}/losses.npy',
    f'--workdir={tmp_path}/scored',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'scored' / 'scores.csv').exists()
  result = run(sys.executable, '-c', 'import aul_jax; print(aul_jax.__file__, aul_jax.__version__)')
  assert result.stdout.startswith(str(target)), result.stdout
