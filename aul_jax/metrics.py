"""Detection quality against the injected ground truth: AUROC, precision, recall, F1."""

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import metrics as sk_metrics


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
  # AUROC is undefined when every example is clean (or every one mislabeled).
  auroc = float('nan')
  if 0 < truth.sum() < truth.size:
    auroc = float(sk_metrics.roc_auc_score(truth, np.asarray(score_N, np.float64)))
  return {
    'true_noise_rate': float(truth.mean()),
    'auroc': auroc,
    'precision': float(precision),
    'recall': float(recall),
    'f1': float(f1),
  }


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
