"""A workdir belongs to one run: the lock, and training and scoring outputs kept apart."""

import json
import os

import numpy as np
import pytest

from aul_jax import pipeline, score
from aul_jax import workdir as workdir_lib
from aul_jax.errors import UserInputError
from tests.test_launch import launch
from tests.test_pipeline import load_config


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
  with workdir_lib.held(str(tmp_path), 'a training run'):
    with pytest.raises(UserInputError, match=r'in use by another run \(pid \d+, a training run'):
      with workdir_lib.held(str(tmp_path), 'a scoring run'):
        pass
  with workdir_lib.held(str(tmp_path), 'a scoring run'):  # Released at the end.
    pass


def test_a_run_that_writes_nothing_leaves_no_workdir(tmp_path):
  workdir = tmp_path / 'new'
  with pytest.raises(RuntimeError):
    with workdir_lib.held(str(workdir), 'a training run'):
      raise RuntimeError('failed before any output')
  assert not workdir.exists()


def test_launch_on_a_busy_workdir_exits_2_naming_the_other_run(tmp_path):
  with workdir_lib.held(str(tmp_path), 'a training run'):
    result = launch('--config=configs/digits.py', workdir=tmp_path)
  assert result.returncode == 2
  assert 'is in use by another run (pid' in result.stderr and 'Traceback' not in result.stderr
  assert os.listdir(tmp_path) == ['.lock']  # Nothing written.


def _write_summary(workdir, summary):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f)


def test_the_scorer_refuses_a_training_runs_workdir_before_any_work(tmp_path):
  _write_summary(tmp_path, {'config': {}, 'noise_estimate': 0.4})
  np.save(tmp_path / 'losses.npy', np.ones((20, 3)))
  with pytest.raises(UserInputError, match='holds the outputs of a training run'):
    score.score_files(str(tmp_path), losses=str(tmp_path / 'losses.npy'))
  assert sorted(os.listdir(tmp_path)) == ['losses.npy', 'summary.json']


def test_training_refuses_a_scoring_runs_workdir(tmp_path):
  _write_summary(tmp_path, {'inputs': {'losses': 'x.npy'}, 'noise_estimate': 0.4})
  with pytest.raises(UserInputError, match='holds the outputs of a scoring run'):
    pipeline.run(load_config('digits'), str(tmp_path), log=lambda _: None)
