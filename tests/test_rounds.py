"""Two-round detection, the continuous label quality of hard rules, and the recipe guards."""

import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from aul_jax import config as config_lib
from aul_jax import pipeline, report
from aul_jax import train as train_lib
from aul_jax.errors import Preempted, UserInputError
from tests.test_pipeline import load_config

# The module's trained runs are shared by its tests: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group('rounds')


def _config(rounds):
  config = load_config('digits')
  config.aul.epochs = 4
  config.aul.record_history = False
  config.num_devices = 1
  config.detector.rounds = rounds
  config.checkpoint.every_epochs = 2
  return config


def _scores(workdir):
  path = os.path.join(workdir, 'scores.csv')
  return np.genfromtxt(path, delimiter=',', names=True, dtype=None, encoding='utf-8')


@pytest.fixture(scope='module')
def one_and_two_rounds(tmp_path_factory):
  runs = {}
  for rounds in (1, 2):
    workdir = str(tmp_path_factory.mktemp(f'rounds{rounds}'))
    runs[rounds] = pipeline.run(_config(rounds), workdir, log=lambda _: None), workdir
  return runs


def test_round_two_judges_a_network_that_left_round_ones_flags_out(one_and_two_rounds):
  (single, single_dir), (double, double_dir) = one_and_two_rounds[1], one_and_two_rounds[2]
  first, second = double['rounds']
  # Round 1 is the one-round run: same network, same verdict, same paper's mixture.
  assert first['noise_estimate'] == single['noise_estimate']
  assert first['auroc'] == single['auroc']
  assert double['paper'] == single['paper']
  one, two = _scores(single_dir), _scores(double_dir)
  np.testing.assert_array_equal(two['aul'], one['aul'])  # The AUL run's columns.
  np.testing.assert_array_equal(two['left_out'], one['flagged'])
  # The verdict is round 2's: a negative AUM of the second network.
  np.testing.assert_array_equal(two['score'], -two['round2_aum'])
  np.testing.assert_array_equal(two['flagged'], two['round2_aum'] < 0)
  assert (
    double['noise_estimate'] == second['noise_estimate'] == pytest.approx(two['flagged'].mean())
  )
  assert not np.array_equal(two['round2_aum'], two['aum'])
  assert double['detector']['rounds'] == 2 and single['detector']['rounds'] == 1
  assert 0.0 <= second['test_error'] <= 1.0


def test_a_run_stopped_in_round_two_resumes_identically(one_and_two_rounds, tmp_path):
  _, reference_dir = one_and_two_rounds[2]
  seen = []

  def stop_in_round_two(message):
    if message.startswith('round2 epoch 3/'):
      seen.append(message)
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(Preempted):
    pipeline.run(_config(2), str(tmp_path), log=stop_in_round_two)
  assert seen
  pipeline.run(_config(2), str(tmp_path), log=lambda _: None)
  with open(os.path.join(reference_dir, 'scores.csv'), 'rb') as f:
    assert (tmp_path / 'scores.csv').read_bytes() == f.read()


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('rounds', 3, 'detector.rounds=3; expected 1 or 2'),
    ('rounds', True, 'detector.rounds=True; expected 1 or 2'),
    ('rule', 'threshold', 'detector.rounds=2 with rule threshold'),
  ],
)
def test_bad_round_settings_are_refused(field, value, message):
  config = config_lib.base_config()
  config.detector.rounds = 2
  config.detector[field] = value
  with pytest.raises(UserInputError, match=message):
    config_lib.validate(config, num_devices=1)


def test_hard_rule_quality_is_continuous_and_below_one_half_exactly_when_flagged():
  score_N = np.array([-3.0, -0.1, 0.0, 0.2, 5.0, np.nan])
  quality_N = report.hard_rule_quality(score_N)
  assert np.all(np.diff(quality_N[:5]) < 0)  # Ranks as the score does, strictly.
  np.testing.assert_array_equal(quality_N[:5] < 0.5, score_N[:5] > 0)
  assert quality_N[2] == 0.5 and quality_N[5] == 1.0
  columns = report.detection_columns(np.zeros(6), (score_N > 0).astype(float), score_N, hard=True)
  ranked = report.ranked_issues(columns)
  np.testing.assert_array_equal(ranked['index'], [4, 3, 2, 1, 0, 5])
  assert len(np.unique(ranked['label_quality'])) == 6  # Not collapsed to 0/1.


def _first_update(optimizer, gradient):
  params = {'w': jnp.zeros(3)}
  updates, _ = optimizer.update({'w': gradient}, optimizer.init(params), params)
  return np.asarray(updates['w'])


def test_gradient_clipping_bounds_the_step_and_warmup_ramps_the_rate():
  gradient = jnp.array([300.0, 400.0, 0.0])  # Global norm 500.
  options = {'learning_rate': 0.1, 'momentum': 0.9, 'weight_decay': 0.0, 'steps_per_epoch': 10}
  plain = _first_update(train_lib.make_optimizer(**options), gradient)
  np.testing.assert_allclose(plain, -0.1 * np.asarray(gradient), rtol=1e-6)
  clipped = _first_update(train_lib.make_optimizer(**options, clip_grad_norm=1.0), gradient)
  np.testing.assert_allclose(np.linalg.norm(clipped), 0.1, rtol=1e-6)
  warm = _first_update(train_lib.make_optimizer(**options, warmup_epochs=2), gradient)
  np.testing.assert_allclose(warm, plain / 20, rtol=1e-6)  # Step 1 of 20 warm-up steps.


def _rates(optimizer, steps):
  """The learning rate of each of the first `steps` steps (no momentum, no weight decay)."""
  params, gradient = {'w': jnp.zeros(1)}, {'w': jnp.ones(1)}
  state, rates = optimizer.init(params), []
  for _ in range(steps):
    updates, state = optimizer.update(gradient, state, params)
    rates.append(-float(updates['w'][0]))
  return np.array(rates)


def test_the_cosine_schedule_decays_to_zero_after_the_warmup():
  options = {'learning_rate': 0.1, 'momentum': 0.0, 'weight_decay': 0.0, 'steps_per_epoch': 10}
  cosine = _rates(train_lib.make_optimizer(**options, schedule='cosine', num_epochs=2), 20)
  np.testing.assert_allclose(cosine[[0, 10]], [0.1, 0.05], rtol=1e-6)
  assert np.all(np.diff(cosine) < 0) and cosine[-1] < 0.001
  warm = _rates(
    train_lib.make_optimizer(**options, schedule='cosine', num_epochs=2, warmup_epochs=1), 20
  )
  np.testing.assert_allclose(warm[:10], 0.1 * np.arange(1, 11) / 10, rtol=1e-6)  # The ramp.
  np.testing.assert_allclose(warm[15], 0.05, rtol=1e-6)  # Half-way through the decay.
  step = _rates(train_lib.make_optimizer(**options, lr_drop_epochs=(1,)), 20)
  np.testing.assert_allclose(step, [0.1] * 10 + [0.01] * 10, rtol=1e-6)


@pytest.mark.parametrize(
  'schedule,fractions,message',
  [
    ('linear', (), "retrain.schedule='linear'; expected 'step' or 'cosine'"),
    ('cosine', (0.5,), r'retrain.schedule=cosine decays the rate by itself: set retrain.lr_drop'),
  ],
)
def test_a_bad_schedule_is_refused(schedule, fractions, message):
  config = config_lib.base_config()
  config.retrain.schedule, config.retrain.lr_drop_fractions = schedule, fractions
  with pytest.raises(UserInputError, match=message):
    config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize('field', ['warmup_epochs', 'clip_grad_norm'])
def test_bad_recipe_guards_are_refused(field):
  config = config_lib.base_config()
  config.retrain[field] = -1.0
  with pytest.raises(UserInputError, match=f'retrain.{field}=-1.0; expected a finite number'):
    config_lib.validate(config, num_devices=1)
