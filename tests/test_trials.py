"""Trials: R networks trained side by side in one compiled program, by vmap over the epoch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aul_jax import coteaching, models
from aul_jax import train as train_lib
from aul_jax.errors import Preempted
from tests.test_checkpointing import _stop_at
from tests.test_pipeline import load_config

# The module's trained runs are shared by its tests: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group('trials')

NUM_EXAMPLES = 203  # Not a multiple of the batch: the last batch is partial.
BATCH = 64
TRIALS = 3
EPOCHS = 2


def _data(num_trials=0, seed=0):
  """LeNet-sized random data; with trials, per-trial labels and weights, (R, N)."""
  rng = np.random.default_rng(seed)
  lead = (num_trials,) if num_trials else ()
  return {
    'image': rng.normal(size=(NUM_EXAMPLES, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, 10, lead + (NUM_EXAMPLES,)).astype(np.int32),
    'weight': (rng.random(lead + (NUM_EXAMPLES,)) > 0.2).astype(np.float32),
  }


def _keys(trials):
  return jnp.stack([jax.random.key(10 + r) for r in range(trials)])


def _train(data, keys, *, num_devices=1, trials=0, stream=False, model=None, step=None):
  """EPOCHS epochs of LeNet (or `model`) on `data`; returns (state, aul_state)."""
  mesh = train_lib.make_mesh(jax.devices()[:num_devices])
  model = model or models.get_model('lenet', 10, bn_axis_name=train_lib.DATA_AXIS)
  optimizer = train_lib.make_optimizer(
    learning_rate=0.05, momentum=0.9, weight_decay=1e-4, steps_per_epoch=4
  )
  step = step or train_lib.make_step(model, optimizer)
  init = functools.partial(train_lib.create_train_state, model, optimizer, (8, 8, 1))
  split = train_lib.over_trials(jax.random.split, trials)(keys)
  state = train_lib.over_trials(init, trials)(split[..., 0])
  aul_state = train_lib.init_aul_state(mesh, NUM_EXAMPLES, EPOCHS, 'float32', trials=trials)
  options = {
    'num_examples': NUM_EXAMPLES,
    'batch_size': BATCH,
    'augment_images': False,
    'trials': trials,
    'trial_fields': ('label', 'weight') if trials and data['label'].ndim == 2 else (),
  }
  device_data = dict(data)
  if stream:
    images = device_data.pop('image')
    run_epoch = train_lib.make_streamed_train_epoch(step, mesh, images.__getitem__, **options)
  else:
    run_epoch = train_lib.make_train_epoch(step, mesh, **options)
  return train_lib.train_epochs(
    run_epoch,
    train_lib.replicate(state, mesh),
    aul_state,
    train_lib.replicate(device_data, mesh),
    split[..., 1],
    num_epochs=EPOCHS,
    num_examples=NUM_EXAMPLES,
    on_epoch=lambda epoch, metrics: None,
  )


def _trial(data, r):
  return {k: v if k == 'image' else v[r] for k, v in data.items()}


def _statistics(aul_state):
  return train_lib.host_statistics(aul_state, aul_state.aul_N.ndim == 2)


def _assert_same_dynamics(got, expected, rtol=1e-5, atol=1e-5):
  got = _statistics(got)
  for name, value in _statistics(expected).items():
    np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture(scope='module')
def three_trials():
  data = _data(TRIALS)
  return data, _train(data, _keys(TRIALS), trials=TRIALS)


def test_each_trial_is_the_network_trained_alone(three_trials):
  data, (state, aul_state) = three_trials
  assert aul_state.aul_N.shape == (TRIALS, NUM_EXAMPLES)
  assert jax.tree.leaves(state.params)[0].shape[0] == TRIALS
  for r in range(TRIALS):
    _, alone = _train(_trial(data, r), _keys(TRIALS)[r])
    _assert_same_dynamics(jax.tree.map(lambda a, r=r: a[r], aul_state), alone)
  # Different labels, weights and keys: the trials differ from each other.
  assert not np.allclose(aul_state.aul_N[0], aul_state.aul_N[1])


def test_four_devices_give_the_trials_of_one(three_trials):
  data, (_, one_device) = three_trials
  _, four = _train(data, _keys(TRIALS), trials=TRIALS, num_devices=4)
  _assert_same_dynamics(four, one_device, rtol=1e-4, atol=1e-4)
  # Every trial's per-example state is split over the devices along the examples.
  rows = -(-NUM_EXAMPLES // 4)
  shapes = {shard.data.shape for shard in four.dynamics.margin_sum_N.addressable_shards}
  assert shapes == {(TRIALS, rows)}


def test_streamed_trials_equal_device_resident_trials(three_trials):
  data, (_, resident) = three_trials
  _, streamed = _train(data, _keys(TRIALS), trials=TRIALS, num_devices=2, stream=True)
  _assert_same_dynamics(streamed, resident, rtol=1e-4, atol=1e-4)
  rows = -(-NUM_EXAMPLES // 2)
  assert {shard.data.shape for shard in streamed.aul_N.addressable_shards} == {(TRIALS, rows)}


def test_shared_labels_broadcast_to_every_trial():
  data = _data()
  _, aul_state = _train(data, _keys(2), trials=2)
  _, alone = _train(data, _keys(2)[1])
  _assert_same_dynamics(jax.tree.map(lambda a: a[1], aul_state), alone)


def test_coteaching_pairs_train_as_trials():
  model = models.get_model('lenet', 10, bn_axis_name=train_lib.DATA_AXIS)
  optimizer = train_lib.make_optimizer(
    learning_rate=0.05, momentum=0.9, weight_decay=1e-4, steps_per_epoch=4
  )
  step = coteaching.make_coteaching_step(model, optimizer, max_forget_rate=0.3, gradual_epochs=1)
  init = functools.partial(train_lib.create_train_state, model, optimizer, (8, 8, 1))
  data, keys = _data(), _keys(2)

  def run(trials, key):
    split = train_lib.over_trials(jax.random.split, trials)(key)
    pair = train_lib.over_trials(lambda k: (init(k), init(jax.random.fold_in(k, 1))), trials)
    mesh = train_lib.make_mesh(jax.devices()[:1])
    run_epoch = train_lib.make_train_epoch(
      step, mesh, num_examples=NUM_EXAMPLES, batch_size=BATCH, augment_images=False, trials=trials
    )
    return train_lib.train_epochs(
      run_epoch,
      pair(split[..., 0]),
      train_lib.init_aul_state(mesh, NUM_EXAMPLES, EPOCHS, None, trials=trials),
      train_lib.replicate(data, mesh),
      split[..., 1],
      num_epochs=EPOCHS,
      num_examples=NUM_EXAMPLES,
      on_epoch=lambda epoch, metrics: None,
    )

  _, both = run(2, keys)
  _, second = run(0, keys[1])
  _assert_same_dynamics(jax.tree.map(lambda a: a[1], both), second)


def _digits(trials, epochs=3):
  config = load_config('digits')
  config.trials = trials
  config.aul.epochs = epochs
  config.checkpoint.every_epochs = 1
  return config


@pytest.fixture(scope='module')
def trials_run(tmp_path_factory):
  from aul_jax import pipeline

  workdir = tmp_path_factory.mktemp('trials')
  return pipeline.run(_digits(TRIALS), str(workdir), log=lambda _: None), workdir


def test_pipeline_writes_each_trial_and_detects_on_their_mean(trials_run):
  summary, workdir = trials_run
  scores = np.genfromtxt(
    workdir / 'scores.csv', delimiter=',', names=True, dtype=None, encoding='utf-8'
  )
  trials = [
    np.genfromtxt(workdir / f'trials/scores_trial{r}.csv', delimiter=',', names=True)
    for r in range(TRIALS)
  ]
  for name in ('aul', 'aum', 'confidence', 'correctness'):
    mean = np.mean([t[name] for t in trials], axis=0)
    np.testing.assert_allclose(scores[name], mean, rtol=1e-6, atol=1e-7, err_msg=name)
  # The default: round 1 flags a negative mean AUM; round 2 (trials too) judges by its own.
  np.testing.assert_array_equal(scores['left_out'], scores['aum'] < 0)
  np.testing.assert_array_equal(scores['p_mislabeled'] > 0.5, scores['round2_aum'] < 0)
  history = np.load(workdir / 'aul_history.npy')
  per_trial = [np.load(workdir / f'trials/aul_history_trial{r}.npy') for r in range(TRIALS)]
  np.testing.assert_allclose(history, np.mean(per_trial, axis=0), rtol=1e-6)
  record = summary['trials']
  assert record['count'] == TRIALS and len(record['test_error']) == TRIALS
  assert summary['aul_model_test_error'] == pytest.approx(np.mean(record['test_error']))
  for name in ('aul', 'aum'):
    assert 0.5 < record['rank_correlation'][name]['spearman_min'] <= 1.0
    auroc = record['auroc'][name]
    assert len(auroc['per_trial']) == TRIALS and auroc['min'] <= auroc['mean'] <= auroc['max']


def test_trial_zero_is_the_single_network_run(trials_run, tmp_path):
  from aul_jax import pipeline

  _, workdir = trials_run
  pipeline.run(_digits(1), str(tmp_path), log=lambda _: None)
  single = np.genfromtxt(tmp_path / 'scores.csv', delimiter=',', names=True)
  trial0 = np.genfromtxt(workdir / 'trials/scores_trial0.csv', delimiter=',', names=True)
  for name in ('aul', 'aum', 'last_loss'):
    np.testing.assert_allclose(trial0[name], single[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_trials_resume_identically(trials_run, tmp_path):
  from aul_jax import pipeline

  _, workdir = trials_run
  with pytest.raises(Preempted):
    pipeline.run(_digits(TRIALS), str(tmp_path), log=_stop_at('aul epoch 2/'))
  pipeline.run(_digits(TRIALS), str(tmp_path), log=lambda _: None)
  for name in ('scores.csv', 'aul_history.npy', 'trials/scores_trial2.csv'):
    assert (tmp_path / name).read_bytes() == (workdir / name).read_bytes(), name
