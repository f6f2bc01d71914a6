"""Fault injection: kill -9 inside an epoch, a checkpoint save, a stage artifact and the output
writes; damaged checkpoints, artifacts and state files. After one rerun each ends in the
uninterrupted run's bytes, or in a one-line error; nothing half-written is taken for done.

20 kill -9 points at random times of the full digits default: benchmarks/fault_injection.py.
Concurrent runs on one workdir: tests/test_workdir.py.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from aul_jax import pipeline
from aul_jax.errors import Preempted, UserInputError
from tests.test_checkpointing import _files
from tests.test_pipeline import ROOT, load_config

# The module's trained runs are shared by its tests: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group('faults')

# The digits default (two detection rounds), short, with a checkpoint after every epoch so
# that there are older checkpoints to fall back to.
OVERRIDES = {'aul.epochs': 3, 'checkpoint.every_epochs': 1, 'tensorboard': False}


def _config():
  config = load_config('digits')
  for name, value in OVERRIDES.items():
    section, _, field = name.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


@pytest.fixture(scope='module')
def uninterrupted_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  pipeline.run(_config(), str(workdir), log=lambda _: None)
  return workdir


@pytest.fixture(scope='module')
def uninterrupted(uninterrupted_workdir):
  return _files(uninterrupted_workdir)


def _rerun(workdir) -> list[str]:
  """Reruns the same command in this process; returns its log lines."""
  lines = []
  pipeline.run(_config(), str(workdir), log=lines.append)
  return lines


def _assert_same_as(uninterrupted, workdir):
  assert _files(workdir) == uninterrupted
  leftovers = [n for n in os.listdir(workdir) if n.startswith('.outputs-')]
  assert not leftovers, leftovers


# Where a fresh launch.py process kills itself with SIGKILL: (module, attribute patched,
# which calls count (an expression of the call's arguments `a`), the counted call to die at,
# and whether to die before or after the original runs).
FAULTS = {
  # The 5th epoch: epoch 2 of the second detection round.
  'inside an epoch': ('aul_jax.train', '_epoch_metrics', 'True', 5, 'before'),
  # Straight after the 4th checkpoint save starts: orbax is still writing it.
  'inside a checkpoint save': ('aul_jax.checkpointing', 'Stage.save', 'True', 4, 'after'),
  # The AUL stage's artifact written but not yet renamed into place.
  'inside a stage artifact write': ('os', 'replace', "str(a[1]).endswith('aul.npz')", 1, 'before'),
  # The outputs half staged, and half renamed into place.
  'while staging the outputs': ('os', 'chmod', "'.outputs-' in str(a[0])", 2, 'before'),
  'between the output renames': ('os', 'replace', "'.outputs-' in str(a[0])", 3, 'before'),
}

_SCRIPT = """
import importlib, os, signal, sys
sys.argv[1:] = {argv!r}
owner = importlib.import_module({module!r})
*path, name = {attribute!r}.split('.')
for part in path:
  owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]
def patched(*a, **k):
  counted = {counts}
  calls[0] += counted
  if counted and calls[0] == {n} and {when!r} == 'before':
    os.kill(os.getpid(), signal.SIGKILL)
  result = original(*a, **k)
  if counted and calls[0] == {n}:
    os.kill(os.getpid(), signal.SIGKILL)
  return result
setattr(owner, name, patched)
import launch
from absl import app
launch.define_flags()
app.run(launch.main)
"""


def _killed_run(workdir, fault: str) -> None:
  module, attribute, counts, n, when = FAULTS[fault]
  argv = ['--config=configs/digits.py', f'--workdir={workdir}']
  argv += [f'--config.{name}={value}' for name, value in OVERRIDES.items()]
  script = _SCRIPT.format(
    argv=argv, module=module, attribute=attribute, counts=counts, n=n, when=when
  )
  result = subprocess.run(
    [sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


@pytest.mark.parametrize('fault', sorted(FAULTS))
def test_kill_9_then_one_rerun_gives_the_uninterrupted_bytes(fault, uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  _killed_run(workdir, fault)
  assert not (workdir / 'summary.json').exists()  # A killed run is never taken for complete.
  _rerun(workdir)
  _assert_same_as(uninterrupted, workdir)


@pytest.fixture(scope='module')
def stopped(tmp_path_factory):
  """A workdir stopped by SIGTERM after epoch 3 of the AUL stage (checkpoints 2 and 3 kept)
  and one stopped in the second round (the AUL stage's artifact written)."""
  workdirs = {}
  for name, prefix in (('aul', 'aul epoch 3/'), ('round2', 'round2 epoch 2/')):
    workdir = tmp_path_factory.mktemp(f'stopped_{name}')

    def log(message, prefix=prefix):
      if message.startswith(prefix):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
      pipeline.run(_config(), str(workdir), log=log)
    workdirs[name] = workdir
  return workdirs


def _copy(stopped, name, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(stopped[name], workdir)
  return workdir


def _checkpoint_files(workdir, stage, step):
  directory = workdir / 'checkpoints' / stage / str(step)
  return sorted(p for p in directory.rglob('*') if p.is_file())


DAMAGE = {
  'files deleted': lambda files: [f.unlink() for f in files[: len(files) // 2 + 1]],
  'files truncated': lambda files: [f.write_bytes(f.read_bytes()[:7]) for f in files],
  'files overwritten with garbage': lambda files: [f.write_bytes(os.urandom(64)) for f in files],
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_an_older_one(
  damage, stopped, uninterrupted, tmp_path
):
  workdir = _copy(stopped, 'aul', tmp_path)
  steps = sorted(
    int(p.name) for p in (workdir / 'checkpoints' / 'aul').iterdir() if p.name.isdigit()
  )
  assert steps[-2:] == [2, 3]
  DAMAGE[damage](_checkpoint_files(workdir, 'aul', 3))
  lines = _rerun(workdir)
  damaged = [line for line in lines if 'is damaged' in line]
  assert len(damaged) == 1 and 'checkpoint 3 of stage aul' in damaged[0], lines
  assert str(workdir / 'checkpoints' / 'aul') in damaged[0]
  assert 'resuming the aul stage after epoch 2' in lines
  _assert_same_as(uninterrupted, workdir)


def test_with_every_checkpoint_damaged_the_stage_starts_over(stopped, uninterrupted, tmp_path):
  workdir = _copy(stopped, 'aul', tmp_path)
  for step in (2, 3):
    DAMAGE['files overwritten with garbage'](_checkpoint_files(workdir, 'aul', step))
  lines = _rerun(workdir)
  assert 'no intact checkpoint of stage aul is left; starting it over' in lines
  _assert_same_as(uninterrupted, workdir)


def test_a_damaged_stage_artifact_reruns_its_stage(stopped, uninterrupted, tmp_path):
  workdir = _copy(stopped, 'round2', tmp_path)
  artifact = workdir / 'checkpoints' / 'aul.npz'
  artifact.write_bytes(artifact.read_bytes()[:100])
  lines = _rerun(workdir)
  assert any(
    line.startswith('the results of stage aul') and 'rerunning it' in line for line in lines
  )
  _assert_same_as(uninterrupted, workdir)


@pytest.mark.parametrize('name', ['checkpoints/run.json', 'summary.json'])
@pytest.mark.parametrize('content', ['{"config": ', '[1, 2]', '\x00\x01garbage'])
def test_damaged_state_files_are_one_line_errors(name, content, stopped, tmp_path):
  workdir = _copy(stopped, 'aul', tmp_path)
  (workdir / name).write_text(content)
  with pytest.raises(UserInputError) as info:
    _rerun(workdir)
  message = str(info.value)
  assert str(workdir / name) in message and '\n' not in message
  assert 'delete it' in message


def test_a_complete_run_missing_an_output_is_repaired_without_training(
  uninterrupted_workdir, uninterrupted, tmp_path
):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted_workdir, workdir)
  (workdir / 'scores.csv').unlink()
  lines = _rerun(workdir)
  assert any('lacks scores.csv; writing its outputs again' in line for line in lines), lines
  assert not any(' epoch ' in line for line in lines)  # Read back, not trained again.
  _assert_same_as(uninterrupted, workdir)
