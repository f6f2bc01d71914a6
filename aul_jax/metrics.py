"""Detection quality against the injected ground truth: AUROC, precision, recall, F1."""

import jax
import jax.numpy as jnp
import numpy as np


def detection_metrics(
  score_N: np.ndarray, flagged_N: np.ndarray, is_mislabeled_N: np.ndarray
) -> dict[str, float]:
  """How well `score_N` ranks and `flagged_N` finds the truly mislabeled examples."""
  truth = np.asarray(is_mislabeled_N, bool)
  flagged = np.asarray(flagged_N, bool)
  true_positives = int(np.sum(flagged & truth))
  precision = true_positives / max(int(flagged.sum()), 1)
  recall = true_positives / max(int(truth.sum()), 1)
  f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return {
    'true_noise_rate': float(truth.mean()),
    'auroc': auroc(score_N, truth),
    'precision': float(precision),
    'recall': float(recall),
    'f1': float(f1),
  }


def auroc(score_N: np.ndarray, truth_N: np.ndarray) -> float:
  """AUROC of `score_N` for the boolean `truth_N`; NaN with only one class. Equals sklearn's
  roc_auc_score: for each mislabeled example it counts the clean ones scored lower (ties
  count half), the Mann-Whitney statistic, several times faster at N = 50,000."""
  score_N, truth_N = np.asarray(score_N, np.float64), np.asarray(truth_N, bool)
  positive, negative = score_N[truth_N], np.sort(score_N[~truth_N])
  if positive.size == 0 or negative.size == 0:
    return float('nan')
  below = np.searchsorted(negative, positive, side='left')
  below_or_tied = np.searchsorted(negative, positive, side='right')
  twice_wins = 2 * int(below.sum()) + int((below_or_tied - below).sum())
  return twice_wins / (2 * positive.size * negative.size)


def auroc_on_device(score_N: jax.Array, truth_N: jax.Array) -> jax.Array:
  """AUROC of `score_N` against the boolean `truth_N`, jittable; ties count one half.

  The Mann-Whitney statistic from sorted negatives, so the per-epoch AUROC of the AUL can
  be tracked without copying the accumulator to the host. NaN without both classes.
  """
  score_N = score_N.astype(jnp.float32)
  negatives = jnp.sort(jnp.where(truth_N, jnp.inf, score_N))
  num_neg = jnp.sum(~truth_N)
  below = jnp.searchsorted(negatives, score_N, side='left')
  not_above = jnp.minimum(jnp.searchsorted(negatives, score_N, side='right'), num_neg)
  wins = jnp.where(truth_N, below + 0.5 * (not_above - below), 0.0)
  num_pos = jnp.sum(truth_N)
  return jnp.sum(wins) / (num_pos * num_neg)
