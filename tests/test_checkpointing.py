"""Preemption-safe checkpoints: exact resume, config mismatch, finished runs, divergence."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from aul_jax import pipeline
from aul_jax.errors import DivergedError, Preempted, UserInputError
from tests.test_pipeline import ROOT, load_config

# The module's trained runs are shared by its tests: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group('checkpointing')


def _config(method='aul'):
  config = load_config('digits')
  config.method = method
  config.aul.epochs = 4
  config.retrain.epochs = 4
  config.checkpoint.every_epochs = 2
  # One detection round: these tests are about the stages' checkpoints, and a second round
  # adds one more stage of the same kind (tests/test_rounds.py resumes inside it).
  config.detector.rounds = 1
  return config


def _stop_at(message_prefix, occurrence=1):
  """A log function that sends this process SIGTERM at the n-th `message_prefix` logged."""
  seen = []

  def log(message):
    if message.startswith(message_prefix):
      seen.append(message)
      if len(seen) == occurrence:
        os.kill(os.getpid(), signal.SIGTERM)

  return log


def _files(workdir):
  names = ('scores.csv', 'aul_history.npy')
  return {n: (workdir / n).read_bytes() for n in names if (workdir / n).exists()}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  summary = pipeline.run(_config(), str(workdir), log=lambda _: None)
  return summary, _files(workdir)


@pytest.mark.parametrize(
  'stop_after, occurrence',
  [('aul epoch 1/', 1), ('aul epoch 3/', 1), ('retraining', 1), ('retrain epoch 3/', 1)],
  ids=['aul-epoch1', 'aul-epoch3', 'retrain-start', 'retrain-epoch3'],
)
def test_stopped_and_resumed_run_is_identical(stop_after, occurrence, uninterrupted, tmp_path):
  summary, files = uninterrupted
  with pytest.raises(Preempted, match='rerun the same command'):
    pipeline.run(_config(), str(tmp_path), log=_stop_at(stop_after, occurrence))
  assert not (tmp_path / 'scores.csv').exists()
  resumed_log = []
  resumed = pipeline.run(_config(), str(tmp_path), log=resumed_log.append)
  assert any(line.startswith('resuming') for line in resumed_log)
  assert _files(tmp_path) == files  # Byte-identical scores.csv and history.
  assert resumed['test_error'] == summary['test_error']
  assert resumed['aul_model_test_error'] == summary['aul_model_test_error']


def test_baseline_resumes_identically(tmp_path):
  config = _config('standard')
  reference = pipeline.run(config, str(tmp_path / 'a'), log=lambda _: None)
  with pytest.raises(Preempted):
    pipeline.run(config, str(tmp_path / 'b'), log=_stop_at('retrain epoch 1/'))
  resumed = pipeline.run(config, str(tmp_path / 'b'), log=lambda _: None)
  assert resumed['test_error'] == reference['test_error']
  assert (tmp_path / 'a/scores.csv').read_bytes() == (tmp_path / 'b/scores.csv').read_bytes()


def test_config_mismatch_is_refused_with_the_differing_fields(tmp_path):
  with pytest.raises(Preempted):
    pipeline.run(_config(), str(tmp_path), log=_stop_at('aul epoch 1/'))
  changed = _config()
  changed.aul.learning_rate = 0.05
  changed.noise.rate = 0.2
  with pytest.raises(UserInputError) as error:
    pipeline.run(changed, str(tmp_path), log=lambda _: None)
  assert 'aul.learning_rate: 0.1 -> 0.05' in str(error.value)
  assert 'noise.rate: 0.4 -> 0.2' in str(error.value)
  assert not (tmp_path / 'scores.csv').exists()


def test_force_continues_with_the_new_config(tmp_path):
  with pytest.raises(Preempted):
    pipeline.run(_config(), str(tmp_path), log=_stop_at('aul epoch 1/'))
  changed = _config()
  changed.eval_batch_size = 60
  summary = pipeline.run(changed, str(tmp_path), log=lambda _: None, force=True)
  assert summary['config']['eval_batch_size'] == 60


def test_finished_run_is_not_redone(tmp_path):
  pipeline.run(_config(), str(tmp_path), log=lambda _: None)
  before = (tmp_path / 'scores.csv').stat().st_mtime_ns
  lines = []
  pipeline.run(_config(), str(tmp_path), log=lines.append)
  assert lines == [f'the run in {tmp_path} is already complete; nothing to do']
  assert (tmp_path / 'scores.csv').stat().st_mtime_ns == before
  changed = _config()
  changed.seed = 5
  with pytest.raises(UserInputError, match='seed: 0 -> 5'):
    pipeline.run(changed, str(tmp_path), log=lambda _: None)


def test_changed_labels_are_refused(tmp_path):
  with pytest.raises(Preempted):
    pipeline.run(_config(), str(tmp_path), log=_stop_at('aul epoch 1/'))
  changed = _config()
  changed.data.split_seed = 1  # Other examples in the training split: other labels.
  with pytest.raises(UserInputError, match='training labels differ'):
    pipeline.run(changed, str(tmp_path), log=lambda _: None, force=True)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  make_train_epoch = pipeline.train.make_train_epoch

  def poisoned_make_train_epoch(*args, **kwargs):
    """Fault injection: the parameters turn NaN during epoch index 4 (the 5th epoch)."""
    run_epoch = make_train_epoch(*args, **kwargs)

    def poisoned(state, aul_state, data, key, epoch):
      if epoch == 4:
        state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
      return run_epoch(state, aul_state, data, key, epoch)

    return poisoned

  monkeypatch.setattr(pipeline.train, 'make_train_epoch', poisoned_make_train_epoch)
  config = _config()
  config.aul.epochs = 8
  config.checkpoint.every_epochs = 1
  config.checkpoint.max_to_keep = 20
  with pytest.raises(DivergedError, match=r'epoch 5, step 0'):
    pipeline.run(config, str(tmp_path), log=lambda _: None)
  assert not (tmp_path / 'scores.csv').exists()
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints/aul') if s.isdigit())
  assert steps == [1, 2, 3, 4]  # The diverged epoch is never saved; the good ones are kept.


def test_sigterm_from_outside_saves_and_exits_nonzero(tmp_path):
  script = (
    'import os, signal, sys; sys.argv[1:] = ["--config=configs/digits.py", '
    f'"--workdir={tmp_path}", "--config.aul.epochs=200", "--config.checkpoint.every_epochs=0"];'
    'import launch; from absl import app; from aul_jax import train;'
    'orig = train._epoch_metrics\n'
    'def epoch_metrics(epoch, *a):\n'
    '  if epoch == 2: os.kill(os.getpid(), signal.SIGTERM)\n'
    '  return orig(epoch, *a)\n'
    'train._epoch_metrics = epoch_metrics\n'
    'launch.define_flags(); app.run(launch.main)'
  )
  result = subprocess.run(
    [sys.executable, '-c', script],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert result.returncode == 75, result.stderr[-2000:]
  assert 'rerun the same command to resume' in result.stderr
  assert 'Traceback' not in result.stderr
  assert os.listdir(tmp_path / 'checkpoints/aul') and not (tmp_path / 'scores.csv').exists()


def _threshold_config():
  config = _config()
  config.detector.rule = 'threshold'
  config.detector.threshold_runs = 2
  return config


@pytest.fixture(scope='module')
def uninterrupted_threshold(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('threshold')
  log = []
  summary = pipeline.run(_threshold_config(), str(workdir), log=log.append)
  return summary, _files(workdir), log


def test_threshold_rule_trains_its_runs_and_judges_by_them(uninterrupted_threshold):
  summary, files, log = uninterrupted_threshold
  assert summary['detector']['rule'] == 'threshold' and 'gmm' not in summary
  assert summary['paper']['gmm']['weights']  # The paper's AUL mixture, beside the rule's flags.
  assert any(line.startswith('threshold epoch 4/4') for line in log)  # Both runs, as trials.
  scores = np.genfromtxt(
    files['scores.csv'].decode().splitlines(), delimiter=',', names=True, dtype=None
  )
  flagged = np.char.lower(scores['flagged'].astype(str)) == 'true'
  assert summary['noise_estimate'] == pytest.approx(flagged.mean())
  assert np.isfinite(scores['score']).all()  # Two disjoint sets: everyone judged.
  assert np.array_equal(flagged, scores['score'] > 0)  # Flagged: AUM below the threshold.
  assert summary['auroc'] > 0.8


@pytest.mark.parametrize('stop_after', ['threshold epoch 1/', 'threshold epoch 3/'])
def test_threshold_runs_resume_identically(stop_after, uninterrupted_threshold, tmp_path):
  summary, files, _ = uninterrupted_threshold
  with pytest.raises(Preempted):
    pipeline.run(_threshold_config(), str(tmp_path), log=_stop_at(stop_after))
  resumed_log = []
  resumed = pipeline.run(_threshold_config(), str(tmp_path), log=resumed_log.append)
  assert any(line.startswith('resuming the threshold') for line in resumed_log)
  assert _files(tmp_path) == files
  assert resumed['test_error'] == summary['test_error']
  assert resumed['noise_estimate'] == summary['noise_estimate']
