"""Tests for the synthetic label-noise models."""

import numpy as np
import pytest

from aul_jax import noise
from aul_jax.errors import UserInputError

K = 10


def _labels(n: int, num_classes: int = K) -> np.ndarray:
  """Balanced labels 0..K-1 repeated, as int64 to check the int32 cast."""
  return np.arange(n, dtype=np.int64) % num_classes


@pytest.mark.parametrize('kind', noise.NOISE_KINDS)
@pytest.mark.parametrize('n', [1, 7, 1000, 1003])
def test_realised_rate_is_exact(kind, n):
  rate = 0.0 if kind == 'none' else 0.35
  noisy, mask = noise.corrupt_labels(_labels(n), K, kind, rate, seed=0)
  assert noisy.dtype == np.int32 and noisy.shape == (n,)
  assert mask.dtype == bool and mask.shape == (n,)
  assert mask.sum() == round(rate * n)


@pytest.mark.parametrize('kind', ['uniform', 'pair_flip'])
def test_mask_marks_exactly_the_changed_labels(kind):
  labels = _labels(500)
  noisy, mask = noise.corrupt_labels(labels, K, kind, 0.4, seed=3)
  np.testing.assert_array_equal(mask, noisy != labels)
  assert np.all(noisy >= 0) and np.all(noisy < K)


def test_none_leaves_labels_unchanged():
  labels = _labels(50)
  noisy, mask = noise.corrupt_labels(labels, K, 'none', 0.0, seed=0)
  np.testing.assert_array_equal(noisy, labels)
  assert not mask.any()


@pytest.mark.parametrize('kind', ['uniform', 'pair_flip'])
def test_same_seed_same_output_different_seed_different(kind):
  labels = _labels(1000)
  first = noise.corrupt_labels(labels, K, kind, 0.3, seed=7)
  again = noise.corrupt_labels(labels, K, kind, 0.3, seed=7)
  other = noise.corrupt_labels(labels, K, kind, 0.3, seed=8)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[1], other[1])


def test_uniform_spreads_evenly_over_the_other_classes():
  labels = _labels(100_000)
  noisy, mask = noise.corrupt_labels(labels, K, 'uniform', 0.5, seed=0)
  shifts = (noisy[mask] - labels[mask]) % K
  assert shifts.min() >= 1  # Never the true class.
  counts = np.bincount(shifts, minlength=K)[1:]
  expected = mask.sum() / (K - 1)
  chi_square = np.sum((counts - expected) ** 2 / expected)
  assert chi_square < 40, f'counts {counts} are far from uniform (chi^2 = {chi_square:.1f}, df 8)'


def test_pair_flip_moves_y_to_y_plus_one():
  labels = _labels(1000)
  noisy, mask = noise.corrupt_labels(labels, K, 'pair_flip', 0.4, seed=0)
  np.testing.assert_array_equal(noisy[mask], (labels[mask] + 1) % K)
  np.testing.assert_array_equal(noisy[~mask], labels[~mask])


@pytest.mark.parametrize(
  'kind,rate', [('none', 0.0), ('uniform', 0.0), ('uniform', 0.6), ('pair_flip', 0.3)]
)
def test_transition_matrix_rows_sum_to_one(kind, rate):
  matrix = noise.transition_matrix(kind, rate, K)
  assert matrix.shape == (K, K) and matrix.dtype == np.float64
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
  np.testing.assert_allclose(np.diag(matrix), 1.0 - rate)


def test_transition_matrix_values():
  uniform = noise.transition_matrix('uniform', 0.3, 4)
  np.testing.assert_allclose(uniform[0], [0.7, 0.1, 0.1, 0.1])
  flip = noise.transition_matrix('pair_flip', 0.3, 4)
  np.testing.assert_allclose(flip[3], [0.3, 0.0, 0.0, 0.7])
  np.testing.assert_array_equal(noise.transition_matrix('none', 0.0, 3), np.eye(3))


@pytest.mark.parametrize('kind', ['uniform', 'pair_flip'])
def test_transition_matrix_matches_empirical_transitions(kind):
  labels = _labels(200_000)
  noisy, _ = noise.corrupt_labels(labels, K, kind, 0.4, seed=1)
  counts = np.zeros((K, K))
  np.add.at(counts, (labels, noisy), 1)
  empirical = counts / counts.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(empirical, noise.transition_matrix(kind, 0.4, K), atol=0.01)


@pytest.mark.parametrize(
  'kwargs,expected',
  [
    ({'kind': 'gaussian'}, "'gaussian'"),
    ({'kind': 'gaussian'}, 'none, uniform, pair_flip'),
    ({'rate': 1.0}, '1.0'),
    ({'rate': -0.1}, '-0.1'),
    ({'rate': float('nan')}, 'nan'),
    ({'rate': '0.2'}, "'0.2'"),
    ({'kind': 'none', 'rate': 0.2}, '0.2'),
    ({'num_classes': 1}, 'num_classes 1'),
    ({'num_classes': 2.5}, '2.5'),
    ({'labels': np.array([0, 1, 10])}, 'label 10 at index 2, out of range'),
    ({'labels': np.array([0, -1, 2])}, 'negative label -1 at index 1'),
    ({'labels': np.array([0.0, 1.0])}, 'float64'),
    ({'labels': np.zeros((2, 2), np.int32)}, '(2, 2)'),
    ({'seed': -1}, 'seed -1'),
  ],
)
def test_bad_inputs_raise_user_input_error(kwargs, expected):
  args = {'labels': _labels(20), 'num_classes': K, 'kind': 'uniform', 'rate': 0.2, 'seed': 0}
  args.update(kwargs)
  with pytest.raises(UserInputError) as info:
    noise.corrupt_labels(**args)
  assert expected in str(info.value)


def test_transition_matrix_validates_too():
  with pytest.raises(UserInputError, match="'flip'"):
    noise.transition_matrix('flip', 0.2, K)
  with pytest.raises(UserInputError, match='1.5'):
    noise.transition_matrix('uniform', 1.5, K)
