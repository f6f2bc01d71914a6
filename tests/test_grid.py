"""The experiment grid: flag parsing, aggregation on synthetic results, resume, the CLI."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from aul_jax import outputs
from aul_jax.errors import Preempted, UserInputError
from experiments import grid
from tests.test_pipeline import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U04 = grid.NoiseSetting('uniform', 0.4)
P02 = grid.NoiseSetting('pair_flip', 0.2)


def result(method, setting, trial, error=None, **summary):
  """A result dict as run_grid returns it, without training anything."""
  overrides = {
    'method': method,
    'noise.kind': setting.kind,
    'noise.rate': setting.rate,
    'noise.seed': trial,
    'seed': trial,
  }
  run = f'{method}-{setting.slug}-trial{trial}'
  if error is not None:
    return {'run': run, 'overrides': overrides, 'config': {}, 'error': error}
  return {'run': run, 'overrides': overrides, 'config': {}, 'summary': summary}


# ----------------------------------------------------------------------- flag parsing


def test_noise_specs_parse_in_order():
  settings = grid.parse_noise(['uniform:0.40', ' pair_flip:0.2'])
  assert settings == (U04, P02)
  assert [s.spec for s in settings] == ['uniform:0.4', 'pair_flip:0.2']
  assert [s.slug for s in settings] == ['uniform0.4', 'pair_flip0.2']
  assert [s.spec for s in grid.parse_noise(grid.DETECTION_NOISE)][-1] == 'pair_flip:0.4'
  assert len(grid.DETECTION_NOISE) == 13


@pytest.mark.parametrize(
  'values, message',
  [
    (['uniform:abc'], "'uniform:abc' is not KIND:RATE"),
    (['uniform'], "'uniform' is not KIND:RATE"),
    (['gauss:0.2'], "'gauss:0.2': noise kind 'gauss' is unknown"),
    (['uniform:1.0'], 'expected a number in [0, 1)'),
    (['uniform:nan'], 'expected a number in [0, 1)'),
    (['uniform:0.4', 'uniform:0.40'], 'uniform:0.4 given more than once'),
    ([''], 'expected a comma-separated list'),
    ([], 'expected a comma-separated list'),
  ],
)
def test_bad_noise_specs_are_named(values, message):
  with pytest.raises(UserInputError, match=message.replace('[', r'\[').replace(')', r'\)')):
    grid.parse_noise(values)


def test_methods_models_seeds_and_trials_are_checked():
  assert grid.parse_methods(['standard', 'aul']) == ('standard', 'aul')
  with pytest.raises(UserInputError, match="unknown method 'magic'; known: aul, standard"):
    grid.parse_methods(['aul', 'magic'])
  with pytest.raises(UserInputError, match='aul given more than once'):
    grid.parse_methods(['aul', 'aul'])
  assert grid.parse_models(['lenet', 'mlp']) == ('lenet', 'mlp')
  with pytest.raises(UserInputError, match="unknown model 'vgg'"):
    grid.parse_models(['vgg'])
  assert grid.parse_seeds(['0', '3']) == (0, 3)
  with pytest.raises(UserInputError, match='non-negative integers'):
    grid.parse_seeds(['0', 'x'])
  assert grid.check_trials(1) == 1
  with pytest.raises(UserInputError, match='--trials=0; expected an integer >= 1'):
    grid.check_trials(0)


def test_runs_are_named_and_seeded_per_trial():
  runs = grid.table_runs(('aul', 'standard'), (U04,), trials=2)
  assert [r.name for r in runs] == [
    'aul-uniform0.4-trial0',
    'standard-uniform0.4-trial0',
    'aul-uniform0.4-trial1',
    'standard-uniform0.4-trial1',
  ]
  config = grid.run_config(load_config('digits'), runs[3])
  assert (config.method, config.noise.kind, config.noise.rate) == ('standard', 'uniform', 0.4)
  assert config.noise.seed == config.seed == 1
  detection = grid.detection_runs((P02,), trials=1)[0]
  assert (
    detection.name == 'pair_flip0.2-trial0' and dict(detection.overrides)['retrain.epochs'] == 0
  )
  names = [r.name for r in grid.consistency_runs(('lenet', 'resnet20'), (0, 1))]
  assert names == ['lenet-seed0', 'lenet-seed1', 'resnet20-seed0', 'resnet20-seed1']


# ---------------------------------------------------------------------- aggregation


def test_table_cells_layout_missing_and_failed():
  results = [
    result('aul', U04, 0, test_error=0.10),
    result('aul', U04, 1, test_error=0.12),
    result('aul', U04, 2, test_error=0.14),
    result('standard', U04, 0, test_error=0.30),
    result('aul', P02, 0, test_error=0.25),
    result('coteaching', U04, 0, test_error=0.2),
    result('coteaching', U04, 1, error='DivergedError: loss nan'),
  ]
  methods, settings = ('standard', 'aul', 'oracle', 'coteaching'), (P02, U04)
  header, rows = grid.test_error_table(results[::-1], methods, settings)
  assert header == ['method', 'pair_flip:0.2', 'uniform:0.4']
  # Population std (ddof=0) of 10, 12, 14 is sqrt(8/3) = 1.63.
  assert rows == [
    ['standard', '—', '30.0 ± 0.0'],
    ['aul', '25.0 ± 0.0', '12.0 ± 1.6'],
    ['oracle', '—', '—'],
    ['coteaching', '—', 'failed'],
  ]
  files = grid.table_files(results, methods, settings)
  assert '| aul | 25.0 ± 0.0 | 12.0 ± 1.6 |' in files['table.md']
  assert 'ddof=0' in files['table.md']
  assert list(csv.reader(io.StringIO(files['table.csv']))) == [header, *rows]
  assert grid.failures(results) == ['coteaching-uniform0.4-trial1: DivergedError: loss nan']


def test_no_test_split_is_a_missing_cell():
  _, rows = grid.test_error_table([result('aul', U04, 0, test_error=None)], ('aul',), (U04,))
  assert rows == [['aul', '—']]


def test_detection_stats_and_files():
  def detected(setting, trial, estimate, precision):
    return result(
      'aul',
      setting,
      trial,
      true_noise_rate=setting.rate,
      noise_estimate=estimate,
      precision=precision,
      recall=0.9,
      f1=0.8,
      auroc=None,  # As written for NaN, e.g. when AUROC is undefined.
    )

  results = [
    detected(U04, 0, 0.42, 0.9),
    detected(U04, 1, 0.46, 0.8),
    detected(P02, 0, 0.3, 0.5),
    result('aul', P02, 1, error='DivergedError: x'),
  ]
  rows = grid.detection_stats(results, (U04, P02, grid.NoiseSetting('uniform', 0.8)))
  u04, p02, missing = rows
  assert (u04['trials'], u04['failed'], u04['true_noise_rate']) == (2, 0, 0.4)
  assert u04['noise_estimate_mean'] == pytest.approx(0.44)
  assert u04['noise_estimate_std'] == pytest.approx(0.02)
  assert u04['precision_mean'] == pytest.approx(0.85) and u04['recall_std'] == 0.0
  assert np.isnan(u04['auroc_mean'])
  assert (p02['trials'], p02['failed']) == (1, 1) and np.isnan(p02['noise_estimate_mean'])
  assert missing['trials'] == 0
  files = grid.detection_files(results, (U04, P02, grid.NoiseSetting('uniform', 0.8)))
  assert '| uniform:0.4 | 2 | 0.400 | 0.440 ± 0.020 | 0.850 ± 0.050 |' in files['detection.md']
  assert '| pair_flip:0.2 | 1 | failed |' in files['detection.md']
  assert '| uniform:0.8 | 0 | — |' in files['detection.md']
  table = list(csv.DictReader(io.StringIO(files['detection.csv'])))
  assert [r['noise'] for r in table] == ['uniform:0.4', 'pair_flip:0.2', 'uniform:0.8']
  assert float(table[0]['noise_estimate_mean']) == pytest.approx(0.44)
  assert files['detection.png'].startswith(b'\x89PNG')


def test_correlations_of_aul():
  aul_N = np.random.default_rng(0).random(500)
  same = grid.correlations(np.stack([aul_N, 2 * aul_N + 3, np.exp(3 * aul_N)]))
  np.testing.assert_allclose(same['spearman'], np.ones((3, 3)))
  assert same['pearson'][0, 1] == pytest.approx(1.0)
  assert 0.9 < same['pearson'][0, 2] < 0.99  # Monotone but not linear.
  shuffled = np.random.default_rng(1).permutation(aul_N)
  mixed = grid.correlations(np.stack([aul_N, shuffled]))
  assert abs(mixed['pearson'][0, 1]) < 0.15 and abs(mixed['spearman'][0, 1]) < 0.15
  assert mixed['spearman'][0, 1] == pytest.approx(stats.spearmanr(aul_N, shuffled).statistic)


def _fake_run(grid_dir, name, labels_N, aul_N):
  outputs.write_run_outputs(
    os.path.join(grid_dir, 'runs', name),
    {'index': np.arange(len(aul_N)), 'label': labels_N, 'aul': aul_N},
    {},
  )
  return {'run': name, 'overrides': {}, 'config': {}, 'summary': {}}


def test_consistency_reads_scores_and_skips_failed_runs(tmp_path):
  rng = np.random.default_rng(0)
  labels_N, aul_N = rng.integers(0, 10, 50), rng.random(50)
  results = [
    _fake_run(tmp_path, 'lenet-seed0', labels_N, aul_N),
    _fake_run(tmp_path, 'mlp-seed0', labels_N, aul_N**2),
    {'run': 'resnet20-seed0', 'overrides': {}, 'config': {}, 'error': 'DivergedError: x'},
  ]
  names, aul_RxN = grid.read_aul(str(tmp_path), results)
  assert names == ['lenet-seed0', 'mlp-seed0']
  np.testing.assert_array_equal(aul_RxN[1], aul_N**2)
  files = grid.consistency_files(names, aul_RxN)
  assert '| lenet-seed0 | 1.000 | 1.000 |' in files['consistency.md'].split('Spearman')[1]
  rows = list(csv.reader(io.StringIO(files['consistency.csv'])))
  assert rows[0] == ['measure', 'run', 'lenet-seed0', 'mlp-seed0'] and len(rows) == 5
  assert files['consistency.png'].startswith(b'\x89PNG')
  _fake_run(tmp_path, 'mlp-seed0', (labels_N + 1) % 10, aul_N)
  with pytest.raises(UserInputError, match='different labels'):
    grid.read_aul(str(tmp_path), results)


# ---------------------------------------------------------------- running and resuming


class Recorder:
  """A stand-in for pipeline.run that records its calls and fails the runs it is told to."""

  def __init__(self, fail=()):
    self.calls, self.fail = [], fail

  def __call__(self, config, workdir, log):
    name = os.path.basename(workdir)
    self.calls.append(name)
    if name in self.fail:
      raise FloatingPointError('loss is nan at step 3')
    return {'method': config.method, 'test_error': 0.25, 'config': config.to_dict()}


def _tiny_config():
  config = load_config('digits')
  config.aul.epochs = 1
  config.retrain.epochs = 1
  config.aul.record_history = False
  return config


def _table(config, grid_dir, **kwargs):
  return grid.table(
    config,
    str(grid_dir),
    methods=('aul', 'standard'),
    settings=(U04,),
    trials=1,
    log=lambda _: None,
    **kwargs,
  )


def test_a_real_grid_resumes_and_retries_failed_runs(tmp_path):
  results, files = _table(_tiny_config(), tmp_path)
  names = ['aul-uniform0.4-trial0', 'standard-uniform0.4-trial0']
  assert [r['run'] for r in results] == names
  for name in names:
    assert os.path.exists(tmp_path / 'runs' / name / 'scores.csv')
    on_disk = json.loads((tmp_path / 'results' / f'{name}.json').read_text())
    assert 0 <= on_disk['summary']['test_error'] <= 1
    assert on_disk['config']['retrain']['epochs'] == 1 and 'config' not in on_disk['summary']
  assert (tmp_path / 'table.md').read_text() == files['table.md']
  assert '| aul |' in files['table.md'] and '| standard |' in files['table.md']

  mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / 'results').iterdir()}
  recorder = Recorder()
  again, _ = _table(_tiny_config(), tmp_path, run_fn=recorder)
  assert recorder.calls == [] and again == results
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / 'results').iterdir()} == mtimes

  failed = {**again[1], 'error': 'DivergedError: loss nan'}
  del failed['summary']
  outputs.write_files(str(tmp_path / 'results'), {f'{names[1]}.json': json.dumps(failed)})
  _, files = _table(_tiny_config(), tmp_path, run_fn=recorder)
  assert recorder.calls == [names[1]]
  assert '| standard | 25.0 ± 0.0 |' in files['table.md']


def test_a_changed_config_is_refused_before_any_run(tmp_path):
  _table(_tiny_config(), tmp_path, run_fn=Recorder())
  config = _tiny_config()
  config.aul.learning_rate = 0.05
  recorder = Recorder()
  with pytest.raises(UserInputError, match='different config .*aul.learning_rate: 0.1 -> 0.05'):
    _table(config, tmp_path, run_fn=recorder)
  assert recorder.calls == []


def test_a_failed_run_does_not_stop_the_grid(tmp_path):
  recorder = Recorder(fail={'aul-uniform0.4-trial0'})
  results, files = _table(_tiny_config(), tmp_path, run_fn=recorder)
  assert recorder.calls == ['aul-uniform0.4-trial0', 'standard-uniform0.4-trial0']
  assert grid.failures(results) == [
    'aul-uniform0.4-trial0: FloatingPointError: loss is nan at step 3'
  ]
  assert '| aul | failed |' in files['table.md']
  retry = Recorder()
  _table(_tiny_config(), tmp_path, run_fn=retry)
  assert retry.calls == ['aul-uniform0.4-trial0']


def test_a_signal_stops_the_grid(tmp_path):
  def preempted(config, workdir, log):
    raise Preempted('stopped by a signal')

  with pytest.raises(Preempted):
    _table(_tiny_config(), tmp_path, run_fn=preempted)
  assert not os.path.exists(tmp_path / 'results')


def test_bad_configs_are_refused_before_any_run(tmp_path):
  config = _tiny_config()
  config.retrain.epochs = 0
  with pytest.raises(UserInputError, match='retrain.epochs > 0'):
    _table(config, tmp_path, run_fn=Recorder())
  config.retrain.epochs = 1
  config.aul.batch_size = 30
  with pytest.raises(UserInputError, match='aul.batch_size=30 is not divisible'):
    _table(config, tmp_path, run_fn=Recorder())
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
  'mode_flags,message',
  [
    (
      ['table', '--noise=uniform:0.2,uniform:abc'],
      "error: --noise: 'uniform:abc' is not KIND:RATE",
    ),
    (
      ['consistency', '--models=mlp', '--seeds=0,2', '--seeds_as_trials'],
      'error: --seeds=0,2 with --seeds_as_trials: expected consecutive seeds',
    ),
  ],
)
def test_cli_reports_a_bad_flag_without_a_traceback(mode_flags, message, tmp_path):
  grid_dir = tmp_path / 'grid'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.grid',
      mode_flags[0],
      '--config=configs/digits.py',
      f'--grid_dir={grid_dir}',
      *mode_flags[1:],
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert not grid_dir.exists()


def test_seeds_as_trials_make_one_run_per_model_of_consecutive_seeds():
  runs = grid.consistency_runs(('lenet', 'mlp'), (2, 3, 4), seeds_as_trials=True)
  assert [r.name for r in runs] == ['lenet-seeds2-4', 'mlp-seeds2-4']
  assert dict(runs[1].overrides) == {
    'method': 'aul',
    'retrain.epochs': 0,
    'model.name': 'mlp',
    'seed': 2,
    'trials': 3,
  }
  with pytest.raises(UserInputError, match='expected consecutive seeds'):
    grid.consistency_runs(('lenet',), (0, 2), seeds_as_trials=True)


def test_seeds_as_trials_give_the_correlations_of_separate_runs(tmp_path):
  config = _tiny_config()
  config.aul.epochs, config.detector.rounds = 2, 1
  matrices = {}
  for seeds_as_trials in (False, True):
    grid_dir = tmp_path / str(seeds_as_trials)
    results, files = grid.consistency(
      config,
      str(grid_dir),
      model_names=('mlp',),
      seeds=(0, 1),
      seeds_as_trials=seeds_as_trials,
      log=lambda _: None,
    )
    assert len(results) == (1 if seeds_as_trials else 2)
    names, aul_RxN = grid.read_aul(str(grid_dir), results)
    assert names == ['mlp-seed0', 'mlp-seed1']
    matrices[seeds_as_trials] = aul_RxN
    assert '| mlp-seed1 |' in files['consistency.md']
  # Trial r of the one program is the network trained alone with seed r (test_trials).
  np.testing.assert_allclose(matrices[True], matrices[False], rtol=1e-4, atol=1e-5)
  assert not np.allclose(matrices[True][0], matrices[True][1])
