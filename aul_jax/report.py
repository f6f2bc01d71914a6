"""What a run reports: per-example columns, the summary, and cleanlab-style views.

`assemble` is the one output assembly, used by the training pipeline and by `aul_jax.score`
(losses from any framework), so both write the same scores.csv, summary.json and
ranked_issues.csv.
"""

from collections.abc import Mapping

import numpy as np

from aul_jax import detectors, gmm, metrics

# The paper's detector (Section 4.1): the AUL and one two-component mixture. Its noise
# estimate and mixture are reported beside the configured detector's, whichever ran.
PAPER_DETECTOR = {'statistic': 'aul', 'rule': 'gmm'}
# Statistics that are class indices, written as integers.
INTEGER_STATISTICS = ('suggested_label',)


def detection_columns(
  aul_N: np.ndarray,
  p_mislabeled_N: np.ndarray,
  score_N: np.ndarray | None = None,
  statistics: dict[str, np.ndarray] | None = None,
  hard: bool = False,
) -> dict[str, np.ndarray]:
  """scores.csv columns: the AUL, the other training dynamics (if given), the detector's
  score (default: the AUL), p(mislabeled), the flag, and cleanlab's names for them.

  `label_issue` and `label_quality` are what cleanlab's reporting expects from
  `find_label_issues` and its label-quality scores. label_quality is 1 - p_mislabeled, or,
  for a `hard` rule whose p_mislabeled is the 0/1 flag, `hard_rule_quality` of the score.
  """
  p_N = np.asarray(p_mislabeled_N, np.float64)
  score_N = np.asarray(aul_N if score_N is None else score_N, np.float64)
  flagged_N = p_N > 0.5
  others = {k: v for k, v in statistic_columns(statistics or {}).items() if k != 'aul'}
  return {
    'aul': np.asarray(aul_N, np.float64),
    **others,
    'score': score_N,
    'p_mislabeled': p_N,
    'flagged': flagged_N,
    'label_issue': flagged_N,
    'label_quality': label_quality(p_N, score_N, hard),
  }


def label_quality(p_mislabeled_N, score_N, hard: bool) -> np.ndarray:
  """cleanlab's label quality (lower = more likely mislabeled): 1 - p_mislabeled, or, for a
  `hard` rule whose p_mislabeled is the 0/1 flag, `hard_rule_quality` of the score."""
  return hard_rule_quality(score_N) if hard else 1.0 - np.asarray(p_mislabeled_N, np.float64)


def quality_order(quality_N: np.ndarray) -> np.ndarray:
  """Indices by ascending label quality (most likely mislabeled first), ties by index."""
  return np.lexsort((np.arange(len(quality_N)), quality_N))


def statistic_columns(statistics: Mapping[str, np.ndarray], prefix: str = '') -> dict:
  """Per-example statistics as scores.csv columns: floats, class indices as integers."""
  return {
    prefix + k: np.asarray(v, np.int64 if k in INTEGER_STATISTICS else np.float64)
    for k, v in statistics.items()
  }


def hard_rule_quality(score_N: np.ndarray) -> np.ndarray:
  """A continuous label quality for a rule that flags score > 0 (sign, threshold): the
  logistic of -score in units of the scores' standard deviation. It ranks as the score
  does and is below 0.5 exactly for the flagged examples; it is not a calibrated
  probability. NaN scores (never judged) get quality 1."""
  score_N = np.asarray(score_N, np.float64)
  finite = np.isfinite(score_N)
  spread = float(np.std(score_N[finite])) if finite.any() else 0.0
  z_N = np.where(finite, score_N, -np.inf) / (spread if spread > 0 else 1.0)
  return 0.5 * (1.0 - np.tanh(z_N / 2))  # = sigmoid(-z), without overflow.


def detection_summary(
  noise_estimate: float, mixture: gmm.GaussianMixture | None, columns, is_mislabeled_N=None
) -> dict:
  """summary.json fields: the noise estimate, the mixture (one per class for per-class
  rules), and metrics of columns['score'] and columns['flagged'] if the truth is known."""
  summary = {
    'noise_estimate': float(noise_estimate),
    'n_flagged': int(columns['flagged'].sum()),
  }
  if mixture is not None:  # The sign and threshold-sample rules fit none.
    summary['gmm'] = mixture_summary(mixture)
  if is_mislabeled_N is not None:
    truth = np.asarray(is_mislabeled_N, bool)
    summary['true_noise_rate'] = float(truth.mean())
    summary.update(metrics.detection_metrics(columns['score'], columns['flagged'], truth))
  return summary


def mixture_summary(mixture: gmm.GaussianMixture) -> dict:
  """A fitted mixture's parameters as summary.json lists (one row per class for per-class
  rules), components ascending by mean."""
  fields = ('weights', 'means', 'variances', 'log_likelihood', 'n_iter', 'converged')
  return {name: np.asarray(getattr(mixture, name)).tolist() for name in fields}


def paper_summary(paper: detectors.Verdict, is_mislabeled_N=None) -> dict:
  """summary.json's 'paper' entry: the AUL mixture's noise estimate, its mixture and, with
  the truth, how well it flags."""
  summary = {
    **PAPER_DETECTOR,
    'noise_estimate': float(paper.noise_estimate),
    'gmm': mixture_summary(paper.mixture),
  }
  if is_mislabeled_N is not None:
    flagged_N = paper.flagged_N
    truth = np.asarray(is_mislabeled_N, bool)
    quality = metrics.detection_metrics(paper.score_N, flagged_N, truth)
    summary.update({k: v for k, v in quality.items() if k != 'true_noise_rate'})
  return summary


def assemble(
  *,
  num_examples: int,
  labels_N=None,
  statistics: Mapping[str, np.ndarray] | None = None,
  verdict: detectors.Verdict | None = None,
  detector: dict | None = None,
  paper: detectors.Verdict | None = None,
  true_labels_N=None,
  is_mislabeled_N=None,
  ids_N=None,
  **fields,
) -> tuple[dict, dict, dict]:
  """(scores.csv columns, summary.json, other tables) of a run or a scoring.

  With a `verdict` of `detector` on `statistics` (`aul.statistics`), the columns hold the
  statistics, the score and the verdicts, and the summary the estimate and, beside it, the
  paper's result (`paper`: the AUL mixture). `fields` go into the summary as they are.
  """
  scores = {'index': np.arange(num_examples)}
  if ids_N is not None:  # The user's own example ids (the scorer's long format).
    scores['id'] = np.asarray(ids_N)
  if labels_N is not None:
    scores['label'] = np.asarray(labels_N)
  summary = {'n_train': num_examples, **fields}
  tables = {}
  if verdict is not None:
    columns = detection_columns(
      statistics['aul'],
      verdict.p_mislabeled_N,
      verdict.score_N,
      statistics,
      hard=verdict.mixture is None,
    )
    scores.update(columns)
    summary.update(
      detection_summary(verdict.noise_estimate, verdict.mixture, columns, is_mislabeled_N)
    )
    summary['detector'] = dict(detector)
    summary['paper'] = paper_summary(paper, is_mislabeled_N)
    tables['ranked_issues.csv'] = ranked_issues(scores)
  if true_labels_N is not None:
    scores['true_label'] = np.asarray(true_labels_N)
  if is_mislabeled_N is not None:
    scores['is_mislabeled'] = np.asarray(is_mislabeled_N, bool)
    summary['true_noise_rate'] = float(np.mean(is_mislabeled_N))
  return scores, summary, tables


def trials_summary(
  trial_statistics: Mapping[str, np.ndarray], test_errors=None, is_mislabeled_N=None
) -> dict:
  """summary.json's 'trials': how much R networks trained side by side agree.

  Per statistic, the Spearman and Pearson correlations between every pair of trials (the
  paper's Figure 5 measure), and with the truth each trial's AUROC, its mean and spread.
  """
  from scipy import stats  # Here, not above: 0.6 s of import that only trials use.

  summary = {'count': len(next(iter(trial_statistics.values())))}
  if test_errors is not None:
    summary['test_error'] = [None if e is None else float(e) for e in test_errors]
  correlation, auroc = {}, {}
  for name, values_RxN in trial_statistics.items():
    values_RxN = np.asarray(values_RxN, np.float64)
    pairs = np.triu_indices(len(values_RxN), k=1)
    spearman = _correlations(stats.rankdata(values_RxN, axis=1))[pairs]
    pearson = _correlations(values_RxN)[pairs]
    correlation[name] = {
      'spearman_mean': float(np.mean(spearman)),
      'spearman_min': float(np.min(spearman)),
      'pearson_mean': float(np.mean(pearson)),
    }
    if is_mislabeled_N is not None and name in detectors.SCORES:
      score_RxN = [detectors.mislabel_score({name: v}, name) for v in values_RxN]
      truth = np.asarray(is_mislabeled_N, bool)
      per_trial = [metrics.auroc(score_N, truth) for score_N in score_RxN]
      auroc[name] = {
        'per_trial': per_trial,
        'mean': float(np.mean(per_trial)),
        'std': float(np.std(per_trial)),
        'min': float(np.min(per_trial)),
        'max': float(np.max(per_trial)),
      }
  summary['rank_correlation'] = correlation
  if auroc:
    summary['auroc'] = auroc
  return summary


def _correlations(values_RxN: np.ndarray) -> np.ndarray:
  """(R, R) Pearson correlations of the rows; 1 on the diagonal, 0 for a constant row."""
  centred = values_RxN - values_RxN.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(centred, axis=1)
  unit = centred / np.where(norms > 0, norms, 1.0)[:, None]
  return np.clip(unit @ unit.T, -1.0, 1.0)


def trial_tables(trial_statistics: Mapping[str, np.ndarray]) -> dict[str, dict]:
  """trials/scores_trial{r}.csv: each trial's own statistics, one row per example."""
  count = len(next(iter(trial_statistics.values())))
  return {
    f'trials/scores_trial{r}.csv': {
      'index': np.arange(len(next(iter(trial_statistics.values()))[r])),
      **{name: np.asarray(values, np.float64)[r] for name, values in trial_statistics.items()},
    }
    for r in range(count)
  }


def ranked_issues(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every example, lowest label quality (most likely mislabeled) first, ties by index:
  ranked_issues.csv (with the user's `id` beside the index when there is one)."""
  quality_N = columns['label_quality']
  order = quality_order(quality_N)
  ranked = {'rank': np.arange(len(order)), 'index': order}
  if 'id' in columns:
    ranked['id'] = columns['id'][order]
  return {
    **ranked,
    'p_mislabeled': columns['p_mislabeled'][order],
    'label_quality': quality_N[order],
    'label_issue': columns['label_issue'][order],
  }


def round_summary(verdict: detectors.Verdict, is_mislabeled_N=None, **fields) -> dict:
  """One detection round's entry in summary.json's 'rounds': its noise estimate, flags,
  and with the truth how well it flags; `fields` (e.g. its network's test error) beside."""
  columns = {'score': verdict.score_N, 'flagged': verdict.flagged_N}
  summary = detection_summary(verdict.noise_estimate, verdict.mixture, columns, is_mislabeled_N)
  return {**summary, **fields}


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
