"""What a detection reports: per-example columns, the summary, and cleanlab-style views.

Shared by the training pipeline and by `aul_jax.score` (losses from any framework), so
both write the same scores.csv, summary.json and ranked_issues.csv.
"""

import numpy as np

from aul_jax import gmm, metrics


def detection_columns(
  aul_N: np.ndarray,
  p_mislabeled_N: np.ndarray,
  score_N: np.ndarray | None = None,
  statistics: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
  """scores.csv columns: the AUL, the other training dynamics (if given), the detector's
  score (default: the AUL), p(mislabeled), the flag, and cleanlab's names for them.

  `label_issue` and `label_quality` (= 1 - p_mislabeled) are what cleanlab's reporting
  expects from `find_label_issues` and its label-quality scores.
  """
  p_N = np.asarray(p_mislabeled_N, np.float64)
  flagged_N = p_N > 0.5
  others = {k: np.asarray(v, np.float64) for k, v in (statistics or {}).items() if k != 'aul'}
  return {
    'aul': np.asarray(aul_N, np.float64),
    **others,
    'score': np.asarray(aul_N if score_N is None else score_N, np.float64),
    'p_mislabeled': p_N,
    'flagged': flagged_N,
    'label_issue': flagged_N,
    'label_quality': 1.0 - p_N,
  }


def detection_summary(
  noise_estimate: float, mixture: gmm.GaussianMixture | None, columns, is_mislabeled_N=None
) -> dict:
  """summary.json fields: the noise estimate, the mixture (one per class for per-class
  rules), and metrics of columns['score'] and columns['flagged'] if the truth is known."""
  summary = {
    'noise_estimate': float(noise_estimate),
    'n_flagged': int(columns['flagged'].sum()),
  }
  if mixture is not None:  # The threshold-sample rule fits none.
    summary['gmm'] = {
      'weights': np.asarray(mixture.weights).tolist(),
      'means': np.asarray(mixture.means).tolist(),
      'variances': np.asarray(mixture.variances).tolist(),
      'log_likelihood': np.asarray(mixture.log_likelihood).tolist(),
      'n_iter': np.asarray(mixture.n_iter).tolist(),
      'converged': np.asarray(mixture.converged).tolist(),
    }
  if is_mislabeled_N is not None:
    truth = np.asarray(is_mislabeled_N, bool)
    summary['true_noise_rate'] = float(truth.mean())
    summary.update(metrics.detection_metrics(columns['score'], columns['flagged'], truth))
  return summary


def ranked_issues(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every example, most likely mislabeled first (ties by index): ranked_issues.csv."""
  order = np.lexsort((np.arange(len(columns['p_mislabeled'])), -columns['p_mislabeled']))
  return {
    'rank': np.arange(len(order)),
    'index': order,
    'p_mislabeled': columns['p_mislabeled'][order],
    'label_issue': columns['label_issue'][order],
  }


def as_pred_probs(labels_N: np.ndarray, label_quality_N: np.ndarray, num_classes: int):
  """(N, K) probabilities for cleanlab whose self-confidence equals `label_quality_N`.

  The given label gets probability label_quality and the other classes share the rest
  equally, so cleanlab's `get_label_quality_scores(labels, pred_probs,
  method='self_confidence')` returns aul_jax's scores and its reports rank as we do.
  """
  labels_N = np.asarray(labels_N, np.int64)
  quality_N = np.asarray(label_quality_N, np.float64)
  other = (1.0 - quality_N) / max(num_classes - 1, 1)
  pred_probs = np.repeat(other[:, None], num_classes, axis=1)
  pred_probs[np.arange(len(labels_N)), labels_N] = quality_N
  return pred_probs
