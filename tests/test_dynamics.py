"""Training dynamics accumulated with the AUL: AUM, forgetting, cartography, last loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aul_jax import dynamics, losses
from aul_jax import train as train_lib
from tests.test_train import NUM_EXAMPLES, TinyNet, _data, _run


def test_per_example_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, 50)
  out = jax.tree.map(np.asarray, dynamics.per_example(jnp.asarray(logits), jnp.asarray(labels)))
  others = logits.copy()
  others[np.arange(50), labels] = -np.inf
  np.testing.assert_allclose(out['margin'], logits[np.arange(50), labels] - others.max(1), 1e-6)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(out['confidence'], p[np.arange(50), labels], rtol=1e-5)
  np.testing.assert_array_equal(out['correct'], logits.argmax(1) == labels)
  np.testing.assert_array_equal(out['other_class'], others.argmax(1))


def test_per_example_margin_is_computed_in_float32_from_bfloat16_logits():
  logits = jnp.array([[2.0, 1.0, -1.0]], jnp.bfloat16)
  out = dynamics.per_example(logits, jnp.array([1]))
  assert out['margin'].dtype == jnp.float32 and float(out['margin'][0]) == -1.0


def _fold(correct_rows, confidence_rows, loss_rows=None, other_rows=None):
  state = dynamics.init_dynamics(len(correct_rows[0]))
  for t, (correct, confidence) in enumerate(zip(correct_rows, confidence_rows, strict=True)):
    loss = np.full(len(correct), float(t)) if loss_rows is None else loss_rows[t]
    other = np.zeros(len(correct)) if other_rows is None else other_rows[t]
    epoch = {
      'loss': jnp.asarray(loss, jnp.float32),
      'margin': jnp.asarray(confidence, jnp.float32) - 0.5,
      'confidence': jnp.asarray(confidence, jnp.float32),
      'correct': jnp.asarray(correct, jnp.float32),
      'other_class': jnp.asarray(other, jnp.float32),
    }
    state = dynamics.add_epoch(state, epoch)
  return jax.tree.map(np.asarray, dynamics.statistics(state))


def test_forgetting_events_count_learned_then_forgotten_transitions():
  # Columns: learned once and kept; forgotten twice; never learned; learned at the end.
  correct = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1]]
  stats = _fold(correct, [[0.5] * 4] * 4)
  np.testing.assert_array_equal(stats['forgetting_events'], [0, 2, 0, 0])
  np.testing.assert_array_equal(stats['never_learned'], [0, 0, 1, 0])
  np.testing.assert_allclose(stats['correctness'], [1.0, 0.5, 0.0, 0.25])


def test_cartography_confidence_variability_aum_and_last_loss():
  confidence = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.6]])
  loss = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.5]])
  stats = _fold([[1, 0]] * 3, confidence, loss)
  np.testing.assert_allclose(stats['confidence'], confidence.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats['variability'], confidence.std(0), rtol=1e-5)
  np.testing.assert_allclose(stats['aum'], confidence.mean(0) - 0.5, rtol=1e-6)
  np.testing.assert_array_equal(stats['last_loss'], [5.0, 6.5])


def test_suggested_label_is_the_majority_largest_other_class():
  # Columns: 3 in 3 of 5 epochs (a majority, not in a row); always 1; no majority, the
  # later epochs win (0, 6, 6, 7, 7 gives 7); 2 twice then 4 three times.
  other = np.array([[3, 1, 0, 2], [5, 1, 6, 2], [3, 1, 6, 4], [6, 1, 7, 4], [3, 1, 7, 4]])
  stats = _fold([[0] * 4] * 5, [[0.5] * 4] * 5, other_rows=other)
  np.testing.assert_array_equal(stats['suggested_label'], [3, 1, 7, 4])


def test_suggested_label_over_trials_is_the_most_common():
  stats_RxN = {
    'suggested_label': jnp.array([[1.0, 2.0, 5.0], [3.0, 2.0, 6.0], [3.0, 4.0, 7.0]]),
    'aum': jnp.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [2.0, 0.0, 1.0]]),
  }
  combined = jax.tree.map(np.asarray, dynamics.combine_trials(stats_RxN))
  np.testing.assert_array_equal(combined['suggested_label'], [3, 2, 5])  # Ties: trial 0.
  np.testing.assert_allclose(combined['aum'], [2.0, 2.0, 3.0])


def test_statistics_before_any_epoch_are_finite():
  stats = dynamics.statistics(dynamics.init_dynamics(3))
  assert all(np.isfinite(np.asarray(v)).all() for v in stats.values())


def test_train_epoch_accumulates_each_example_once_per_epoch():
  # At learning rate 0 the model is fixed, so after 2 epochs the mean margin, confidence and
  # correctness must equal those of the initial model's logits for every example, the last
  # partial batch included; an example counted twice or dropped would break the equality.
  model = TinyNet(use_batch_norm=False)
  data = _data()
  state, aul_state = _run(1, model, data, epochs=2, learning_rate=0.0)
  logits = model.apply({'params': state.params}, jnp.asarray(data['image']), train=False)
  expected = jax.tree.map(np.asarray, dynamics.per_example(logits, jnp.asarray(data['label'])))
  stats = train_lib.host_statistics(aul_state)
  assert int(aul_state.dynamics.num_epochs) == 2
  np.testing.assert_allclose(stats['aum'], expected['margin'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['confidence'], expected['confidence'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['variability'], 0.0, atol=2e-3)
  np.testing.assert_array_equal(stats['correctness'], expected['correct'].astype(np.float32))
  np.testing.assert_array_equal(stats['forgetting_events'], 0.0)
  loss = np.asarray(losses.cross_entropy(logits, data['label']))
  np.testing.assert_allclose(stats['last_loss'], loss, rtol=1e-5)
  assert stats['aum'].shape == (NUM_EXAMPLES,)


@pytest.mark.parametrize('num_devices', [4])
def test_dynamics_agree_between_one_and_several_devices(num_devices):
  data = _data()
  _, one = _run(1, TinyNet(), data, epochs=3)
  _, many = _run(num_devices, TinyNet(), data, epochs=3)
  a, b = (train_lib.host_statistics(s) for s in (one, many))
  for name in ('aum', 'confidence', 'variability', 'last_loss'):
    np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-4, err_msg=name)
  # Correctness can flip only where the top two logits (nearly) tie.
  assert np.mean(a['correctness'] == b['correctness']) > 0.98
