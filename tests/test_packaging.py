"""Packaging: `pip install -e .` metadata, the typed marker, and a clean ruff tree."""

import importlib.resources
import os
import shutil
import subprocess
import tomllib

import pytest

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
