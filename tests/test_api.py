"""aul_jax.find_label_issues: the detectors of a training run on arrays a user has."""

import numpy as np
import pytest

import aul_jax
from aul_jax import api, detectors
from aul_jax.errors import UserInputError


def noisy_logits(num_examples=300, num_classes=4, epochs=6, rate=0.3, seed=0):
  """(T, N, K) logits of a network that learns the true labels, the given labels and the
  mislabeled mask: the true class's logit grows over epochs."""
  rng = np.random.default_rng(seed)
  true_N = rng.integers(0, num_classes, num_examples)
  flip_N = rng.random(num_examples) < rate
  given_N = np.where(
    flip_N, (true_N + rng.integers(1, num_classes, num_examples)) % num_classes, true_N
  )
  logits = rng.normal(size=(epochs, num_examples, num_classes)).astype(np.float32)
  logits[:, np.arange(num_examples), true_N] += np.linspace(0.5, 4, epochs)[:, None]
  return logits, given_N, true_N, given_N != true_N


def test_finds_the_flipped_labels_and_suggests_the_true_ones():
  logits, given_N, true_N, wrong_N = noisy_logits()
  issues = aul_jax.find_label_issues(given_N, logits=logits)
  assert (issues.statistic, issues.rule) == ('aum', 'sign')
  assert np.mean(issues.is_label_issue_N == wrong_N) > 0.95
  assert abs(issues.noise_estimate - wrong_N.mean()) < 0.05
  flagged = issues.is_label_issue_N & wrong_N
  assert np.mean(issues.suggested_label_N[flagged] == true_N[flagged]) > 0.95


@pytest.mark.parametrize('statistic, rule', [('aum', 'sign'), ('aul', 'gmm')])
def test_ranked_indices_are_the_flagged_examples_by_rising_label_quality(statistic, rule):
  logits, given_N, _, _ = noisy_logits()
  issues = aul_jax.find_label_issues(given_N, logits=logits, statistic=statistic, rule=rule)
  ranked = issues.ranked_indices
  assert set(ranked) == set(np.flatnonzero(issues.is_label_issue_N))
  assert np.all(np.diff(issues.label_quality_N[ranked]) >= 0)
  # Below 0.5 exactly for the flagged; continuous under the hard rule too.
  if rule == 'sign':
    assert len(np.unique(issues.label_quality_N)) > len(given_N) // 2
  np.testing.assert_array_equal(issues.label_quality_N < 0.5, issues.is_label_issue_N)


def test_same_verdict_as_the_detectors_on_the_same_statistics():
  logits, given_N, _, _ = noisy_logits(seed=1)
  stats = api.statistics_from_logits(logits, given_N)
  for statistic, rule in [('aum', 'sign'), ('aul', 'gmm'), ('aum', 'class_gmm')]:
    issues = aul_jax.find_label_issues(given_N, logits=logits, statistic=statistic, rule=rule)
    verdict = detectors.detect(stats, given_N, 4, statistic=statistic, rule=rule)
    np.testing.assert_array_equal(issues.is_label_issue_N, verdict.flagged_N)
    np.testing.assert_allclose(issues.p_mislabeled_N, verdict.p_mislabeled_N)
    assert issues.noise_estimate == pytest.approx(verdict.noise_estimate)


def test_losses_alone_give_the_papers_aul_mixture():
  logits, given_N, _, wrong_N = noisy_logits(seed=2)
  losses_NxT = api.losses_from_logits(logits, given_N)
  issues = aul_jax.find_label_issues(given_N, losses=losses_NxT)
  assert (issues.statistic, issues.rule) == ('aul', 'gmm')
  assert issues.suggested_label_N is None
  np.testing.assert_allclose(issues.statistics['aul'], losses_NxT.sum(1))
  assert np.mean(issues.is_label_issue_N == wrong_N) > 0.9


def test_to_dataframe_has_one_row_per_example():
  pd = pytest.importorskip('pandas')
  logits, given_N, _, _ = noisy_logits(num_examples=50)
  frame = aul_jax.find_label_issues(given_N, logits=logits).to_dataframe()
  assert isinstance(frame, pd.DataFrame) and len(frame) == 50
  assert {'label', 'is_label_issue', 'score', 'p_mislabeled', 'suggested_label', 'aum'} <= set(
    frame.columns
  )


@pytest.mark.parametrize(
  'kwargs, message',
  [
    ({}, 'exactly one of losses=, logits= or statistics=; got none'),
    ({'losses': np.ones((5, 2)), 'logits': np.ones((2, 5, 3))}, 'got losses, logits'),
    ({'losses': np.ones((4, 2))}, 'labels has 5 entries but there are 4 examples'),
    ({'losses': np.array([[1.0, np.nan]] * 5)}, r'losses: entry \(0, 1\) is not finite'),
    ({'logits': np.ones((2, 5))}, r'expected a float \(T, N, K\) array'),
    ({'logits': np.ones((2, 5, 2))}, 'out of range; expected 0..1'),
    ({'losses': np.ones((5, 2)), 'statistic': 'aum'}, "statistic 'aum' needs logits"),
    ({'losses': np.ones((5, 2)), 'rule': 'sign'}, 'rule sign needs a margin statistic'),
  ],
)
def test_bad_input_is_named(kwargs, message):
  with pytest.raises(UserInputError, match=message):
    aul_jax.find_label_issues(np.array([0, 1, 2, 0, 1]), **kwargs)
