"""Detection quality against the injected ground truth: AUROC, precision, recall, F1."""

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
