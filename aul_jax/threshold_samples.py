"""Threshold samples (Pleiss et al., 2020): a statistic's flagging threshold learned from data.

A random N/(K+1) of the training examples is moved to an extra, fake class K. They are
mislabeled by construction, so the distribution of their statistic (AUM) shows what a
mislabeled example looks like on this data and model: an example is flagged when its AUM
is below the 99th percentile of the threshold samples'. Threshold samples cannot be judged
in their own run, so R runs use disjoint threshold sets, and every example is judged in
the runs where it kept its label (with R >= 2, every example is judged at least once).
"""

import numpy as np


def threshold_sets(num_examples: int, num_classes: int, num_runs: int, seed: int) -> list:
  """`num_runs` disjoint random index sets of N // (K + 1) examples each."""
  size = num_examples // (num_classes + 1)
  if num_runs < 1 or num_runs * size > num_examples:
    raise ValueError(
      f'{num_runs} disjoint threshold sets of {size} examples do not fit in {num_examples}'
    )
  order = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(order[r * size : (r + 1) * size]) for r in range(num_runs)]


def relabel(labels_N: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
  """The labels with `indices` moved to the extra class `num_classes`."""
  labels = np.array(labels_N, np.int32)
  labels[indices] = num_classes
  return labels


def judge(aum_RxN: np.ndarray, sets: list, percentile: float = 99.0):
  """Per-example verdicts from R threshold-sample runs of the AUM.

  Returns (margin_N, flagged_N): margin_N is the AUM minus its run's threshold (the
  `percentile`-th percentile of that run's threshold samples' AUM), averaged over the runs
  where the example kept its label (NaN where it never did), and flagged_N = margin_N < 0.
  """
  aum_RxN = np.asarray(aum_RxN, np.float64)
  num_runs, num_examples = aum_RxN.shape
  if num_runs != len(sets):
    raise ValueError(f'{num_runs} runs of AUM but {len(sets)} threshold sets')
  total_N, count_N = np.zeros(num_examples), np.zeros(num_examples)
  for aum_N, indices in zip(aum_RxN, sets, strict=True):
    judged_N = np.ones(num_examples, bool)
    judged_N[indices] = False
    threshold = np.percentile(aum_N[indices], percentile)
    total_N += np.where(judged_N, aum_N - threshold, 0.0)
    count_N += judged_N
  with np.errstate(invalid='ignore'):
    margin_N = np.where(count_N > 0, total_N / np.maximum(count_N, 1), np.nan)
  return margin_N, margin_N < 0
