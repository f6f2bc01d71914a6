"""Every detector on the same noisy labels: ours (each statistic and rule) against the peers.

For each noise setting and seed, one set of noisy labels is drawn and shared by all:
  ours        aul_jax's statistics from one training run (AUL, AUM, confidence, last loss),
              each with each rule of `aul_jax.detectors` (global or per-class mixture);
  aum_ts      AUM with threshold samples (Pleiss et al., 2020): 2 runs with disjoint
              threshold sets, flagged below the 99th percentile of the threshold samples;
  cleanlab    cleanlab's `find_label_issues` on 4-fold cross-validated probabilities from
              the same model and recipe (skipped with a message if cleanlab is absent);
  dividemix   DivideMix's loss mixture (Li et al., 2020): a 2-component GMM on the
              min-max normalised last-epoch loss, fit as DivideMix fits it (scikit-learn,
              10 iterations, reg_covar 5e-4), flagged when p(clean) < 0.5.
Each detector's noise estimate is its mixture weight (ours) or the fraction it flags.

  .venv/bin/python benchmarks/detection.py                      # digits, 6 settings x 3 seeds
  .venv/bin/python benchmarks/detection.py --config configs/mnist_lenet.py --seeds 3

Training runs are cached in --cache (default workdirs/detection_cache), keyed by the
config, so re-running with other detectors costs no training. Ends with one JSON line.
"""

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from sklearn import mixture as sk_mixture
from sklearn import model_selection

from aul_jax import aul, detectors, metrics, pipeline, train
from aul_jax import progress as progress_lib
from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (
  'uniform:0.2',
  'uniform:0.4',
  'uniform:0.6',
  'uniform:0.8',
  'pair_flip:0.2',
  'pair_flip:0.4',
)
STATISTICS = (*detectors.SCORES, 'aum,confidence')
PEERS = ('aum_ts', 'cleanlab', 'dividemix')
CACHE_VERSION = 3  # Bump when what `collect` computes changes.


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('detection_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _quiet() -> progress_lib.Progress:
  return progress_lib.Progress(lambda message: None, workdir=None, interactive=False)


def _train(config, dataset, labels, key):
  job = pipeline.Job(
    stage='aul',
    recipe=config.aul,
    labels_N=labels,
    weights_N=np.ones(len(labels), np.float32),
    key=key,
    num_classes=dataset.num_classes,
  )
  mesh = train.make_mesh(jax.devices()[:1])
  return pipeline.train_network(config, job, dataset, mesh, None, _quiet())


def cross_validated_probs(config, dataset, labels, folds: int, seed: int) -> np.ndarray:
  """(N, K) held-out probabilities: each fold predicted by a model trained on the others."""
  probs = np.zeros((len(labels), dataset.num_classes), np.float32)
  splitter = model_selection.StratifiedKFold(folds, shuffle=True, random_state=seed)
  for fold, (fit_index, held_index) in enumerate(splitter.split(labels, labels)):
    subset = dataclasses.replace(dataset, x_train=dataset.x_train[fit_index])
    key = jax.random.fold_in(jax.random.key(seed), 100 + fold)
    network = _train(config, subset, labels[fit_index], key)
    predict = train.make_predict(
      network.model,
      train.make_mesh(jax.devices()[:1]),
      num_examples=len(held_index),
      batch_size=config.eval_batch_size,
    )
    probs[held_index] = np.asarray(predict(network.state, dataset.x_train[held_index]))
  return probs


def collect(config, kind: str, rate: float, seed: int, args) -> dict[str, np.ndarray]:
  """One setting's noisy labels, our statistics, threshold-sample AUMs and CV probabilities."""
  config = config.copy_and_resolve_references()
  config.noise.kind, config.noise.rate, config.noise.seed, config.seed = kind, rate, seed, seed
  dataset = pipeline.load_data(config.data)
  noisy = pipeline.inject_noise(dataset, config.noise)
  k = dataset.num_classes
  record = {'labels': noisy.labels, 'is_mislabeled': noisy.is_mislabeled, 'num_classes': k}
  network = _train(config, dataset, noisy.labels, jax.random.key(seed))
  statistics = train.to_host(aul.statistics(network.aul_state))
  record.update({f'stat_{name}': v for name, v in statistics.items()})
  # The threshold-sample runs exactly as the pipeline's detector.rule='threshold' runs them.
  config.detector.rule, config.detector.threshold_runs = 'threshold', args.threshold_runs
  mesh = train.make_mesh(jax.devices()[:1])
  extra = pipeline._threshold_statistics(config, dataset, noisy, mesh, None, _quiet())
  record.update(extra)
  if args.cv_folds:
    record['cv_probs'] = cross_validated_probs(config, dataset, noisy.labels, args.cv_folds, seed)
  return record


def cache_key(config, kind, rate, seed, args) -> str:
  """What the training runs depend on: not the detector or mixture settings."""
  training = {k: v for k, v in config.to_dict().items() if k not in ('detector', 'gmm')}
  key = [training, kind, rate, seed, args.threshold_runs, args.cv_folds, CACHE_VERSION]
  return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_collect(config, kind, rate, seed, args) -> dict[str, np.ndarray]:
  digest = cache_key(config, kind, rate, seed, args)
  path = os.path.join(args.cache, f'{kind}_{rate}_{seed}_{digest}.npz')
  if os.path.exists(path):
    with np.load(path) as stored:
      return dict(stored)
  record = collect(config, kind, rate, seed, args)
  os.makedirs(args.cache, exist_ok=True)
  np.savez(path + '.tmp.npz', **record)
  os.replace(path + '.tmp.npz', path)
  return record


# Detectors: record -> (score_N, flagged_N, noise_estimate).


def ours(statistic: str, rule: str, mixture):
  """The library's detector, exactly as the pipeline runs it (`detectors.detect`)."""

  def detect(record, num_classes):
    stats = {k.removeprefix('stat_'): v for k, v in record.items() if k.startswith('stat_')}
    stats.update(threshold_aum=record['threshold_aum'], is_threshold=record['is_threshold'])
    verdict = detectors.detect(
      stats, record['labels'], num_classes, statistic=statistic, rule=rule, mixture=mixture
    )
    return verdict.score_N, verdict.p_mislabeled_N > 0.5, verdict.noise_estimate

  return detect


def cleanlab_detector(record, num_classes):
  from cleanlab import filter as cl_filter
  from cleanlab import rank as cl_rank

  labels, probs = record['labels'], record['cv_probs']
  flagged = cl_filter.find_label_issues(labels, probs, n_jobs=1)
  quality = cl_rank.get_label_quality_scores(labels, probs)
  return -quality, flagged, float(flagged.mean())


def dividemix(record, num_classes):
  loss = record['stat_last_loss'].astype(np.float64)
  loss = (loss - loss.min()) / max(loss.max() - loss.min(), 1e-12)
  fitted = sk_mixture.GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0)
  fitted.fit(loss[:, None])
  p_clean = fitted.predict_proba(loss[:, None])[:, fitted.means_.argmin()]
  flagged = p_clean < 0.5
  return loss, flagged, float(flagged.mean())


def all_detectors(config, with_cleanlab: bool) -> dict:
  found = {
    f'{s}+{r}': ours(s, r, config.gmm)
    for s in STATISTICS
    for r in detectors.RULES
    if r not in ('sign', 'threshold') or s in detectors.SIGNED
  }
  found['aum_ts'] = found.pop('aum+threshold')  # The peer, Pleiss et al.'s threshold samples.
  if with_cleanlab:
    found['cleanlab'] = cleanlab_detector
  found['dividemix'] = dividemix
  return found


def score(detector, record, num_classes) -> dict[str, float]:
  score_N, flagged_N, estimate = detector(record, num_classes)
  truth = record['is_mislabeled']
  row = metrics.detection_metrics(score_N, flagged_N, truth)
  row['estimate'] = estimate
  row['estimate_error'] = estimate - float(truth.mean())
  row['abs_estimate_error'] = abs(row['estimate_error'])
  return row


def cleanlab_available() -> bool:
  return importlib.util.find_spec('cleanlab') is not None


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=str(ROOT / 'configs' / 'digits.py'))
  parser.add_argument('--settings', default=','.join(SETTINGS), help='KIND:RATE,...')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--threshold-runs', type=int, default=2)
  parser.add_argument('--cv-folds', type=int, default=4)
  parser.add_argument('--cache', default=str(ROOT / 'workdirs' / 'detection_cache'))
  parser.add_argument('--quick', action='store_true', help='1 seed, 2 settings, 3 epochs')
  args = parser.parse_args(argv)
  if args.quick:
    args.settings, args.seeds = 'uniform:0.4,pair_flip:0.4', 1
  args.settings = [(s.split(':')[0], float(s.split(':')[1])) for s in args.settings.split(',')]
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  config = load_config(args.config)
  config.num_devices = 1
  if args.quick:
    config.aul.epochs = 3
  with_cleanlab = cleanlab_available()
  if not with_cleanlab:
    print('cleanlab is not installed: its row is skipped (pip install cleanlab)')
  if not with_cleanlab:
    args.cv_folds = 0
  found = all_detectors(config, with_cleanlab)
  default = f'{config.detector.statistic}+{config.detector.rule}'
  results: dict[str, dict[str, list[dict]]] = {}
  for kind, rate in args.settings:
    setting = f'{kind}:{rate}'
    results[setting] = {name: [] for name in found}
    for seed in range(args.seeds):
      record = cached_collect(config, kind, rate, seed, args)
      num_classes = int(record['num_classes'])
      for name, detector in found.items():
        results[setting][name].append(score(detector, record, num_classes))
  summary = summarise(results)
  print_tables(summary)
  verdicts = headline(summary, default)
  print(f'\nThe default detector ({default}) against the best peer (F1), mean over seeds:')
  common.print_table(
    ['setting', 'F1', 'best peer', 'peer F1', 'F1 gain', 'estimate error', 'target met'],
    [
      [
        s,
        v['f1'],
        v['best_peer'],
        v['peer_f1'],
        f'{v["f1_gain"]:+.3f}',
        f'{v["estimate_error"]:+.3f}',
        v['target_met'],
      ]
      for s, v in verdicts.items()
    ],
  )
  record = {
    'config': args.config,
    'seeds': args.seeds,
    'default_detector': default,
    'headline': verdicts,
    'results': summary,
  }
  record['machine'] = common.machine()
  common.emit_json(record)
  return record


METRICS = ('auroc', 'estimate_error', 'abs_estimate_error', 'precision', 'recall', 'f1')


def headline(summary, default: str) -> dict:
  """Per setting: the default detector against the best peer by F1, and the issue's target
  (estimate within 0.03 of the truth; F1 at least the best peer's, +0.05 on pair flip)."""
  out = {}
  for setting, by_detector in summary.items():
    peers = {name: v for name, v in by_detector.items() if name in PEERS}
    best = max(peers, key=lambda name: peers[name]['f1'])
    ours_row = by_detector[default]
    gain = ours_row['f1'] - peers[best]['f1']
    needed = 0.05 if setting.startswith('pair_flip') else 0.0
    out[setting] = {
      'f1': round(ours_row['f1'], 3),
      'best_peer': best,
      'peer_f1': round(peers[best]['f1'], 3),
      'f1_gain': round(gain, 3),
      'estimate_error': round(ours_row['estimate_error'], 3),
      'target_met': bool(abs(ours_row['estimate_error']) <= 0.03 and gain >= needed),
    }
  return out


def summarise(results) -> dict:
  return {
    setting: {
      name: {m: float(np.mean([row[m] for row in rows])) for m in METRICS}
      for name, rows in by_detector.items()
    }
    for setting, by_detector in results.items()
  }


def print_tables(summary) -> None:
  for setting, by_detector in summary.items():
    print(f'\n{setting}')
    rows = [
      [name] + [f'{v[m]:+.3f}' if m == 'estimate_error' else f'{v[m]:.3f}' for m in METRICS]
      for name, v in by_detector.items()
    ]
    common.print_table(['detector', *METRICS], rows)


if __name__ == '__main__':
  main()
