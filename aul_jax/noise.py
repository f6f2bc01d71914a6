"""Synthetic label noise: the uniform and pair-flip noise models of the paper's Section 5.

`corrupt_labels` flips exactly `round(rate * N)` labels, chosen uniformly without
replacement, so the realised noise rate is exact; `transition_matrix` is the expected
p(noisy | true) of that process. Per-class rates match the matrix only in expectation.
"""

import numpy as np

from aul_jax import checks
from aul_jax.errors import UserInputError

NOISE_KINDS = ('none', 'uniform', 'pair_flip')


def transition_matrix(kind: str, rate: float, num_classes: int) -> np.ndarray:
  """Returns the (K, K) float64 matrix whose row y is p(noisy label | true label y)."""
  _check_noise_args(kind, rate, num_classes)
  matrix_KxK = (1.0 - rate) * np.eye(num_classes)
  if kind == 'uniform':
    matrix_KxK += rate / (num_classes - 1) * (1.0 - np.eye(num_classes))
  elif kind == 'pair_flip':
    matrix_KxK += rate * np.roll(np.eye(num_classes), 1, axis=1)
  return matrix_KxK


def corrupt_labels(
  labels: np.ndarray, num_classes: int, kind: str, rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Corrupts exactly round(rate * N) labels; returns (noisy int32 (N,), is_mislabeled (N,)).

  'uniform' moves a chosen label to one of the K-1 other classes with equal probability;
  'pair_flip' moves true class y to (y + 1) mod K; 'none' requires rate == 0.
  `round` is Python's (half to even). The same seed gives the same result.
  """
  _check_noise_args(kind, rate, num_classes)
  labels_N = checks.class_labels(labels, 'labels', num_classes=num_classes)
  _check_seed(seed)
  rng = np.random.default_rng(seed)
  num_flips = round(rate * labels_N.size)
  chosen = rng.choice(labels_N.size, size=num_flips, replace=False)
  if kind == 'uniform':
    shifts = rng.integers(1, num_classes, size=num_flips)
  else:
    shifts = np.ones(num_flips, dtype=np.int64)
  noisy_N = labels_N.copy()
  noisy_N[chosen] = (labels_N[chosen] + shifts) % num_classes
  return noisy_N, noisy_N != labels_N


def _check_noise_args(kind: str, rate: float, num_classes: int) -> None:
  """Raises UserInputError unless kind, rate and num_classes describe a valid noise model."""
  if kind not in NOISE_KINDS:
    raise UserInputError(f'noise kind {kind!r} is unknown; known kinds: {", ".join(NOISE_KINDS)}')
  if not checks.is_number(rate) or not 0 <= rate < 1:
    raise UserInputError(f'noise rate {rate!r} is invalid; expected a number in [0, 1)')
  if kind == 'none' and rate != 0:
    raise UserInputError(
      f"noise rate {rate!r} was given with noise kind 'none'; set the rate to 0 or pick a kind "
      f'from {", ".join(NOISE_KINDS[1:])}'
    )
  if not checks.is_int(num_classes):
    raise UserInputError(f'num_classes {num_classes!r} is invalid; expected an integer >= 2')
  if num_classes < 2:
    raise UserInputError(f'num_classes {num_classes} is invalid; expected at least 2 classes')


def _check_seed(seed: int) -> None:
  """Raises UserInputError unless seed is a non-negative integer (numpy's requirement)."""
  if not checks.is_int(seed) or seed < 0:
    raise UserInputError(f'noise seed {seed!r} is invalid; expected a non-negative integer')
