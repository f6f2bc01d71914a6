"""Detectors: statistic -> score, global and per-class mixtures, threshold samples."""

import numpy as np
import pytest

from aul_jax import detectors, threshold_samples


def _class_dependent_scores(seed=0, n_per_class=400, num_classes=4):
  """Scores whose clean level differs by class, with class-dependent noise rates."""
  rng = np.random.default_rng(seed)
  rates = np.linspace(0.1, 0.5, num_classes)
  labels, scores, truth = [], [], []
  for k in range(num_classes):
    noisy = rng.random(n_per_class) < rates[k]
    clean_level, noisy_level = 2.0 * k, 2.0 * k + 4.0
    scores.append(np.where(noisy, noisy_level, clean_level) + rng.normal(0, 0.5, n_per_class))
    labels.append(np.full(n_per_class, k))
    truth.append(noisy)
  return np.concatenate(scores), np.concatenate(labels), np.concatenate(truth), num_classes


def test_scores_are_oriented_so_that_higher_is_more_suspicious():
  stats = {
    'aul': np.array([1.0, 5.0]),
    'aum': np.array([3.0, -1.0]),
    'confidence': np.array([0.9, 0.1]),
    'last_loss': np.array([0.1, 2.0]),
  }
  for name in detectors.SCORES:
    score = detectors.mislabel_score(stats, name)
    assert score[1] > score[0], name
  with pytest.raises(ValueError, match="unknown statistic 'entropy'"):
    detectors.mislabel_score(stats, 'entropy')


def test_per_class_mixture_recovers_class_dependent_noise():
  score, labels, truth, k = _class_dependent_scores()
  per_class = detectors.class_mixtures(score, labels, k)
  # One global mixture cannot separate modes whose levels overlap across classes.
  pooled = detectors.global_mixture(score)
  assert abs(per_class.noise_estimate - truth.mean()) < 0.02
  assert abs(pooled.noise_estimate - truth.mean()) > 0.05
  flagged = per_class.p_mislabeled_N > 0.5
  assert np.mean(flagged == truth) > 0.98
  assert per_class.mixture.weights.shape == (k, 2)
  for c in range(k):  # Each class's mislabeled weight estimates that class's noise rate.
    assert abs(per_class.mixture.weights[c, 1] - truth[labels == c].mean()) < 0.05


def test_per_class_mixture_ignores_other_classes_entirely():
  score, labels, _, k = _class_dependent_scores()
  base = detectors.class_mixtures(score, labels, k)
  moved = score.copy()
  moved[labels == 0] += 100.0  # Class 0 alone changes; the others' verdicts must not.
  other = detectors.class_mixtures(moved, labels, k)
  keep = labels != 0
  np.testing.assert_allclose(other.p_mislabeled_N[keep], base.p_mislabeled_N[keep], atol=1e-5)


def test_class_rows_list_each_class_once_without_a_membership_matrix():
  labels = np.array([2, 0, 2, 2, 0, 3, 2])  # Class 1 has no example.
  index_KxC, weight_KxC = detectors._class_rows(labels, 4)
  assert index_KxC.shape == weight_KxC.shape == (4, 4)  # K x the largest class, not K x N.
  for c in range(4):
    real = index_KxC[c][weight_KxC[c] > 0]
    np.testing.assert_array_equal(real, np.flatnonzero(labels == c))


def test_each_class_mixture_is_that_class_fit_alone():
  rng = np.random.default_rng(3)
  labels = rng.choice(4, 900, p=[0.6, 0.3, 0.1, 0.0])  # Unequal classes, one empty.
  score = rng.normal(size=900) + 3.0 * (rng.random(900) < 0.3) + labels
  together = detectors.class_mixtures(score, labels, 4, n_init=1)
  for c in range(3):
    only = np.zeros(np.sum(labels == c), int)
    alone = detectors.class_mixtures(score[labels == c], only, 1, n_init=1)
    # The padded row sums in another order, so EM may stop a few steps apart (1e-3 here).
    np.testing.assert_allclose(
      together.p_mislabeled_N[labels == c], alone.p_mislabeled_N, atol=5e-3, err_msg=str(c)
    )
    assert abs(together.mixture.weights[c, 1] - alone.mixture.weights[0, 1]) < 5e-3


def test_detect_takes_plain_arguments():
  score, labels, truth, k = _class_dependent_scores()
  stats = {'aul': score, 'aum': -score, 'confidence': -score, 'last_loss': score}
  mixture = {'max_iter': 500, 'tol': 1e-7, 'n_init': 1}
  verdict = detectors.detect(stats, labels, k, statistic='aum', rule='class_gmm', mixture=mixture)
  np.testing.assert_allclose(verdict.score_N, score)
  assert abs(verdict.noise_estimate - truth.mean()) < 0.02
  with pytest.raises(ValueError, match="unknown rule 'kde'"):
    detectors.detect(stats, labels, k, statistic='aum', rule='kde')
  with pytest.raises(ValueError, match='needs the labels'):
    detectors.detect(stats, statistic='aum', rule='class_gmm')


def test_threshold_sets_are_disjoint_and_of_size_n_over_k_plus_1():
  sets = threshold_samples.threshold_sets(1100, 10, 2, seed=3)
  assert [len(s) for s in sets] == [100, 100]
  assert not set(sets[0]) & set(sets[1])
  again = threshold_samples.threshold_sets(1100, 10, 2, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(sets, again, strict=True))
  with pytest.raises(ValueError, match='do not fit'):
    threshold_samples.threshold_sets(20, 3, 5, seed=0)


def test_relabel_moves_only_the_threshold_samples_to_the_extra_class():
  labels = np.arange(10) % 3
  out = threshold_samples.relabel(labels, np.array([1, 4]), 3)
  np.testing.assert_array_equal(out, [0, 3, 2, 0, 3, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(labels, np.arange(10) % 3)  # The input is not modified.


def test_judge_flags_below_the_threshold_samples_percentile():
  rng = np.random.default_rng(0)
  n = 1000
  sets = threshold_samples.threshold_sets(n, 4, 2, seed=0)
  truth = rng.random(n) < 0.3
  aum = []
  for indices in sets:
    run = np.where(truth, -2.0, 3.0) + rng.normal(0, 0.5, n)
    run[indices] = -2.0 + rng.normal(0, 0.5, len(indices))  # Fake class: like mislabeled.
    aum.append(run)
  margin, flagged = threshold_samples.judge(np.stack(aum), sets, percentile=99.0)
  assert np.isfinite(margin).all()  # Two disjoint sets: every example judged at least once.
  assert np.mean(flagged == truth) > 0.97
  # An example's margin is the mean over the runs where it kept its label.
  i = sets[0][0]
  expected = aum[1][i] - np.percentile(aum[1][sets[1]], 99.0)
  assert margin[i] == pytest.approx(expected)
  with pytest.raises(ValueError, match='2 runs of AUM but 1 threshold sets'):
    threshold_samples.judge(np.stack(aum), sets[:1])
  # The rule 'threshold' is the same verdict, from the runs' statistics.
  is_threshold = np.zeros((2, n), bool)
  for r, indices in enumerate(sets):
    is_threshold[r, indices] = True
  stats = {'threshold_aum': np.stack(aum), 'is_threshold': is_threshold}
  verdict = detectors.detect(stats, statistic='aum', rule='threshold')
  np.testing.assert_array_equal(verdict.p_mislabeled_N > 0.5, flagged)
  np.testing.assert_allclose(verdict.score_N, -margin)


def test_several_statistics_are_fit_jointly_and_standardised():
  # Two statistics in very different units, each alone a weak separator; jointly strong.
  rng = np.random.default_rng(1)
  n = 3000
  truth = rng.random(n) < 0.3
  aul = np.where(truth, 1.5, 0.0) + rng.normal(0, 1.0, n)  # ~loss units
  aum = np.where(truth, -150.0, 0.0) + rng.normal(0, 100.0, n)  # 100x larger spread
  stats = {'aul': aul, 'aum': aum, 'confidence': np.zeros(n), 'last_loss': np.zeros(n)}
  score = detectors.mislabel_score(stats, 'aul,aum')
  assert score.shape == (n, 2)
  joint = detectors.global_mixture(score, n_init=5)
  alone = [detectors.global_mixture(score[:, d], n_init=5) for d in range(2)]
  accuracy = lambda v: np.mean((v.p_mislabeled_N > 0.5) == truth)  # noqa: E731
  assert accuracy(joint) > max(accuracy(v) for v in alone) + 0.03
  assert abs(joint.noise_estimate - truth.mean()) < 0.03
  assert joint.score_N.shape == (n,)  # One ranking score: the mean standardised score.
  per_class = detectors.class_mixtures(score, (np.arange(n) % 3), 3, n_init=5)
  assert abs(per_class.noise_estimate - truth.mean()) < 0.04


def test_statistic_names_are_checked():
  assert detectors.statistic_names('aum, confidence') == ('aum', 'confidence')
  with pytest.raises(ValueError, match="unknown statistic 'margin'"):
    detectors.statistic_names('aum,margin')
  with pytest.raises(ValueError, match='twice'):
    detectors.statistic_names('aum,aum')


def test_sign_rule_flags_negative_margins_and_estimates_their_fraction():
  aum = np.array([2.0, -0.5, 0.1, -3.0, 0.0])
  verdict = detectors.detect({'aum': aum}, statistic='aum', rule='sign')
  np.testing.assert_array_equal(verdict.p_mislabeled_N, [0, 1, 0, 1, 0])  # A tie is clean.
  np.testing.assert_array_equal(verdict.score_N, -aum)
  assert verdict.noise_estimate == pytest.approx(0.4) and verdict.mixture is None


def test_rule_and_statistic_must_go_together():
  detectors.check('aum', 'sign')
  detectors.check('aul,aum', 'class_gmm')
  for statistic in ('aul', 'confidence', 'aum,confidence'):
    for rule in ('sign', 'threshold'):
      with pytest.raises(ValueError, match=f'rule {rule} needs a margin statistic'):
        detectors.check(statistic, rule)
  with pytest.raises(ValueError, match="unknown rule 'kde'"):
    detectors.check('aum', 'kde')
