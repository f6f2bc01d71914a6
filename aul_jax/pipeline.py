"""The AUL pipeline: noisy labels -> AUL training run -> Gaussian mixture -> retraining.

Steps 1-3 of the method (paper Sections 3, 4.1 and 4.2) and the paper's baselines, split
into named functions that each do one thing; `run` strings them together for `launch.py`.
"""

import dataclasses
import importlib.metadata
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from aul_jax import (
  aul,
  checkpointing,
  data,
  detectors,
  distributed,
  figures,
  models,
  noise,
  outputs,
  report,
  retrain,
  threshold_samples,
  train,
)
from aul_jax import config as config_lib
from aul_jax import (
  progress as progress_lib,
)
from aul_jax.errors import UserInputError

_VERSIONED_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'scikit-learn')
Log = Callable[[str], None]
Progress = progress_lib.Progress


@dataclasses.dataclass(frozen=True)
class NoisyLabels:
  labels: np.ndarray  # (N,) int32 labels the model is trained on.
  true_labels: np.ndarray  # (N,) int32 labels as the data source gave them.
  is_mislabeled: np.ndarray  # (N,) bool, known because we injected the noise.
  injected: bool  # False when noise.kind == 'none': the truth is then unknown.


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
  model: Any
  state: Any  # A TrainState, or a pair of them for co-teaching.
  aul_state: aul.AULState  # On the device.


@dataclasses.dataclass(frozen=True)
class Detection:
  aul_state: aul.AULState  # On the device: the AUL, its history and the other dynamics.
  verdict: detectors.Verdict  # The configured detector's score, p(mislabeled) and estimate.
  test_error: float | None  # Of the network trained for the AUL.


@dataclasses.dataclass(frozen=True)
class StageCheckpoint:
  """How one training stage ('aul' or 'retrain') saves and resumes its epochs."""

  checkpointer: checkpointing.Checkpointer
  stage: str
  step_offset: int  # Checkpoint step = step_offset + epochs done in this stage.
  resume: tuple[int, dict] | None  # The newest checkpoint; used if it is of this stage.
  items: dict  # Saved with every checkpoint besides the training state (labels, detection).
  meta: dict  # Extra JSON metadata saved with every checkpoint.


def _resume(checkpoint: StageCheckpoint | None, state, aul_state, progress: Progress):
  """The stage's state from its newest checkpoint, if there is one: (state, aul_state, epoch)."""
  if checkpoint is None or checkpoint.resume is None:
    return state, aul_state, 0
  step, meta = checkpoint.resume
  if meta['stage'] != checkpoint.stage:
    return state, aul_state, 0
  like = {'train': {'state': state, 'aul_state': aul_state}}
  restored = checkpoint.checkpointer.restore(step, like)['train']
  progress.log(
    f'resuming the {checkpoint.stage} stage after epoch {meta["epoch"]} (checkpoint {step})'
  )
  return restored['state'], restored['aul_state'], meta['epoch']


def _saver(checkpoint: StageCheckpoint | None, num_epochs: int):
  """(due, save) for train.train_epochs, or None without checkpointing."""
  if checkpoint is None:
    return None

  def save(epochs_done, state, aul_state):
    items = {'train': {'state': state, 'aul_state': aul_state}, **checkpoint.items}
    meta = {'stage': checkpoint.stage, 'epoch': epochs_done, **checkpoint.meta}
    checkpoint.checkpointer.save(checkpoint.step_offset + epochs_done, items, meta)

  return lambda epochs_done: checkpoint.checkpointer.due(epochs_done, num_epochs), save


def inject_noise(dataset: data.Dataset, noise_config: ml_collections.ConfigDict) -> NoisyLabels:
  """Corrupts the training labels as configured, keeping the ground-truth mask."""
  labels, is_mislabeled = noise.corrupt_labels(
    dataset.y_train, dataset.num_classes, noise_config.kind, noise_config.rate, noise_config.seed
  )
  return NoisyLabels(labels, dataset.y_train, is_mislabeled, noise_config.kind != 'none')


def train_network(
  config: ml_collections.ConfigDict,
  recipe: ml_collections.ConfigDict,
  dataset: data.Dataset,
  labels_N: np.ndarray,
  weights_N: np.ndarray,
  mesh: jax.sharding.Mesh,
  key: jax.Array,
  progress: Progress,
  *,
  stage: str,
  method: str = 'standard',
  history_dtype: str | None = None,
  truth_N: np.ndarray | None = None,
  checkpoint: StageCheckpoint | None = None,
  num_classes: int | None = None,
) -> TrainedNetwork:
  """Trains a fresh network with `recipe` (config.aul or config.retrain) and `method`,
  resuming from and saving to `checkpoint` when given. With `truth_N`, the AUL's AUROC
  is reported every epoch. `num_classes` overrides the data set's (threshold samples
  train with one extra class)."""
  num_examples = len(labels_N)
  model = models.get_model(
    config.model.name,
    num_classes or dataset.num_classes,
    bn_axis_name=train.DATA_AXIS,
    dtype=jnp.dtype(config.model.dtype),
  )
  optimizer = train.make_optimizer(
    learning_rate=recipe.learning_rate,
    momentum=recipe.momentum,
    weight_decay=recipe.weight_decay,
    steps_per_epoch=retrain.steps_per_epoch(num_examples, recipe.batch_size),
    lr_drop_epochs=retrain.lr_drop_epochs(recipe.epochs, recipe.lr_drop_fractions),
    lr_drop_factor=recipe.lr_drop_factor,
  )
  init_key, train_key = jax.random.split(key)
  step, state = retrain.step_and_state(
    method,
    model,
    optimizer,
    lambda k: train.create_train_state(model, optimizer, dataset.x_train.shape[1:], k),
    init_key,
    config.retrain,
    config.noise.rate,
  )
  epoch_options = {
    'num_examples': num_examples,
    'batch_size': recipe.batch_size,
    'augment_images': dataset.augment,
    'draw_weights': retrain.draw_weights(method),
  }
  train_data = {'label': labels_N.astype(np.int32), 'weight': np.asarray(weights_N, np.float32)}
  if config.data.input == 'stream':
    load_images = dataset.x_train.__getitem__
    run_epoch = train.make_streamed_train_epoch(step, mesh, load_images, **epoch_options)
  else:
    run_epoch = train.make_train_epoch(step, mesh, **epoch_options)
    train_data['image'] = dataset.x_train
  if truth_N is not None:
    train_data['is_mislabeled'] = np.asarray(truth_N, bool)
  state, aul_state, start_epoch = _resume(
    checkpoint,
    train.replicate(state, mesh),
    train.replicate(aul.init_aul_state(num_examples, recipe.epochs, history_dtype), mesh),
    progress,
  )
  progress.start_stage(
    stage, recipe.epochs, start_epoch, checkpoint.step_offset if checkpoint else 0
  )
  state, aul_state = train.train_epochs(
    run_epoch,
    state,
    aul_state,
    train.replicate(train_data, mesh),
    train_key,
    num_epochs=recipe.epochs,
    num_examples=num_examples,
    on_epoch=lambda epoch, metrics: progress.epoch(epoch, recipe.epochs, metrics),
    start_epoch=start_epoch,
    checkpoint=_saver(checkpoint, recipe.epochs),
  )
  progress.end_stage()
  return TrainedNetwork(model, retrain.evaluated_state(state), aul_state)


def test_error(config, network: TrainedNetwork, dataset: data.Dataset, mesh) -> float | None:
  """Fraction of test examples misclassified; None when the data set has no test split."""
  num_test = len(dataset.y_test)
  if num_test == 0:
    return None
  evaluate = train.make_evaluate(
    network.model, mesh, num_examples=num_test, batch_size=config.eval_batch_size
  )
  images, labels = train.replicate((dataset.x_test, dataset.y_test.astype(np.int32)), mesh)
  return 1.0 - int(evaluate(network.state, images, labels)) / num_test


def judge(config, aul_state: aul.AULState, noisy: NoisyLabels, num_classes: int, sets, aum_RxN):
  """Step 2: the configured detector on the run's statistics (or, for the threshold rule,
  on the AUM `aum_RxN` of the runs with threshold-sample `sets`)."""
  if config.detector.rule == 'threshold':
    return detectors.threshold_verdict(aum_RxN, sets, config.detector.threshold_percentile)
  statistics = train.to_host(aul.statistics(aul_state))
  return detectors.detect(statistics, noisy.labels, num_classes, config.detector, config.gmm)


def _threshold_sets(config, noisy: NoisyLabels, num_classes: int) -> list:
  try:
    return threshold_samples.threshold_sets(
      len(noisy.labels), num_classes, config.detector.threshold_runs, config.seed
    )
  except ValueError as e:
    raise UserInputError(f'detector.threshold_runs={config.detector.threshold_runs}: {e}') from None


def threshold_run(
  config, dataset, noisy, run: int, indices, mesh, progress: Progress, checkpoint=None
):
  """Threshold-sample run `run` (Pleiss et al.): the examples at `indices` moved to an
  extra class K; returns every example's AUM in it, on the host."""
  k = dataset.num_classes
  network = train_network(
    config,
    config.aul,
    dataset,
    threshold_samples.relabel(noisy.labels, indices, k),
    np.ones(len(noisy.labels), np.float32),
    mesh,
    jax.random.fold_in(jax.random.key(config.seed), 2 + run),
    progress,
    stage=f'threshold{run}',
    num_classes=k + 1,
    checkpoint=checkpoint,
  )
  return train.to_host(aul.statistics(network.aul_state)['aum'])


def detect(config, dataset, noisy: NoisyLabels, mesh, progress: Progress, checkpoint=None):
  """Step 1: the AUL (and other dynamics) of every example, and its network's test error."""
  network = train_network(
    config,
    config.aul,
    dataset,
    noisy.labels,
    np.ones(len(noisy.labels), np.float32),
    mesh,
    jax.random.key(config.seed),
    progress,
    stage='aul',
    history_dtype=_history_dtype(config),
    truth_N=noisy.is_mislabeled if noisy.injected else None,
    checkpoint=checkpoint,
  )
  error = test_error(config, network, dataset, mesh)
  progress.scalar('aul/test_error', error, config.aul.epochs)
  return network.aul_state, error


def _history_dtype(config) -> str | None:
  return config.aul.history_dtype if config.aul.record_history else None


def _restore_finished(config, checkpointer, resume, noisy: NoisyLabels, mesh, num_runs: int):
  """From a later stage's checkpoint: the AUL run's state and the threshold runs' AUM."""
  n = len(noisy.labels)
  like = {
    'detection': train.replicate(
      aul.init_aul_state(n, config.aul.epochs, _history_dtype(config)), mesh
    ),
  }
  if num_runs:  # Saved only once a threshold run has finished.
    like['threshold_aum'] = np.zeros((num_runs, n), np.float32)
  restored = checkpointer.restore(resume[0], like)
  return restored['detection'], list(train.to_host(restored.get('threshold_aum', [])))


def retrain_network(
  config, dataset, noisy: NoisyLabels, detection, mesh, progress: Progress, checkpoint=None
) -> float | None:
  """Step 3 (or a baseline): a network trained from scratch; returns its test error."""
  p_N = None if detection is None else detection.verdict.p_mislabeled_N
  weights_N = retrain.example_weights(config.method, p_N, noisy.is_mislabeled)
  progress.log(f'retraining from scratch with method {config.method!r}')
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  network = train_network(
    config,
    config.retrain,
    dataset,
    noisy.labels,
    weights_N,
    mesh,
    key,
    progress,
    stage='retrain',
    method=config.method,
    checkpoint=checkpoint,
  )
  error = test_error(config, network, dataset, mesh)
  progress.scalar('retrain/test_error', error, config.retrain.epochs)
  return error


def package_versions() -> dict[str, str]:
  return {name: importlib.metadata.version(name) for name in _VERSIONED_PACKAGES}


def _detection_outputs(config, detection: Detection, noisy: NoisyLabels):
  """scores.csv columns and summary.json fields of the detection stage."""
  # A dict comprehension, not to_host: pytree maps sort the keys, and the columns keep
  # the documented order.
  statistics = {k: np.asarray(v) for k, v in aul.statistics(detection.aul_state).items()}
  verdict = train.to_host(detection.verdict)
  columns = report.detection_columns(
    statistics['aul'], verdict.p_mislabeled_N, verdict.score_N, statistics
  )
  truth = noisy.is_mislabeled if noisy.injected else None
  summary = report.detection_summary(verdict.noise_estimate, verdict.mixture, columns, truth)
  summary['detector'] = {'statistic': config.detector.statistic, 'rule': config.detector.rule}
  if config.detector.rule == 'threshold':
    summary['detector'].update(
      statistic='aum',
      threshold_runs=config.detector.threshold_runs,
      threshold_percentile=config.detector.threshold_percentile,
    )
  summary['aul_model_test_error'] = detection.test_error
  return columns, summary


def _outputs(config, dataset, noisy: NoisyLabels, detection: Detection | None, final_error):
  """The columns of scores.csv and the contents of summary.json."""
  scores = {'index': np.arange(len(noisy.labels)), 'label': noisy.labels}
  summary = {
    'method': config.method,
    'n_train': len(noisy.labels),
    'num_classes': dataset.num_classes,
    'test_error': final_error,
  }
  if detection is not None:
    columns, detection_summary = _detection_outputs(config, detection, noisy)
    scores.update(columns)
    summary.update(detection_summary)
  if noisy.injected:
    scores.update({'true_label': noisy.true_labels, 'is_mislabeled': noisy.is_mislabeled})
    summary['true_noise_rate'] = float(noisy.is_mislabeled.mean())
  return scores, summary


def _figures(dataset, noisy: NoisyLabels, aul_N, mixture, history_TxN) -> dict[str, bytes]:
  """The paper's figures that apply to this run (Figs. 1, 2, 6 and 8), as PNG bytes."""
  return figures.run_figures(
    aul_N=aul_N,
    mixture=mixture,
    is_mislabeled_N=noisy.is_mislabeled if noisy.injected else None,
    history_NxT=None if history_TxN is None else np.asarray(history_TxN, np.float32).T,
    images_NxHxWxC=dataset.x_train,
    labels_N=noisy.labels,
    true_labels_N=noisy.true_labels if noisy.injected else None,
  )


def _finished_summary(workdir: str, config, force: bool) -> dict | None:
  """The summary of a finished run in `workdir` made with this config, else None."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  checkpointing.require_same_config(
    summary['config'], config, f'the finished run in {workdir}', force
  )
  return None if force else summary


def _check_same_labels(checkpointer, resume, noisy: NoisyLabels) -> None:
  """A resumed run must train on the labels it started with (the data may have changed)."""
  if resume is None:
    return
  like = {'labels': noisy.labels, 'is_mislabeled': noisy.is_mislabeled}
  stored = train.to_host(checkpointer.restore(resume[0], {'labels': like})['labels'])
  if not all(np.array_equal(stored[k], like[k]) for k in like):
    raise UserInputError(
      'the training labels differ from those in the checkpoint (did the data or the noise '
      'change?); use a new --workdir'
    )


def _threshold_runs(config) -> int:
  return config.detector.threshold_runs if config.detector.rule == 'threshold' else 0


def _detection_stages(config, dataset, noisy, mesh, checkpointer, resume, labels, progress):
  """Steps 1-2 as checkpointed stages: the AUL run ('aul'), then any threshold-sample runs
  ('threshold0', ...). A later stage's checkpoints carry the earlier stages' results."""
  num_runs = _threshold_runs(config)
  sets = _threshold_sets(config, noisy, dataset.num_classes) if num_runs else []
  stages = ['aul'] + [f'threshold{r}' for r in range(num_runs)] + ['retrain']
  current = stages.index(resume[1]['stage']) if resume is not None else 0
  if current == 0:
    aul_stage = StageCheckpoint(checkpointer, 'aul', 0, resume, labels, {})
    aul_state, error = detect(config, dataset, noisy, mesh, progress, aul_stage)
    threshold_aum = []
  else:
    done = min(current - 1, num_runs)
    aul_state, threshold_aum = _restore_finished(config, checkpointer, resume, noisy, mesh, done)
    error = resume[1]['aul_test_error']
  for run in range(len(threshold_aum), num_runs):
    items = _finished_items(labels, aul_state, threshold_aum)
    offset = config.aul.epochs * (1 + run)
    stage = StageCheckpoint(
      checkpointer, f'threshold{run}', offset, resume, items, {'aul_test_error': error}
    )
    aum_N = threshold_run(config, dataset, noisy, run, sets[run], mesh, progress, stage)
    threshold_aum.append(aum_N)
  threshold_aum = np.asarray(threshold_aum, np.float32).reshape(num_runs, len(noisy.labels))
  verdict = judge(config, aul_state, noisy, dataset.num_classes, sets, threshold_aum)
  return Detection(aul_state, verdict, error), threshold_aum


def _finished_items(labels, aul_state, threshold_aum) -> dict:
  """What a checkpoint after the AUL stage carries: the labels, the AUL run's state and
  the finished threshold runs' AUM (none before the first has finished)."""
  items = {**labels, 'detection': aul_state}
  if len(threshold_aum):
    items['threshold_aum'] = np.asarray(threshold_aum, np.float32)
  return items


def _train_and_detect(config, dataset, noisy, mesh, checkpointer, progress: Progress):
  """Detection (method 'aul') and retraining, resuming from the newest checkpoint."""
  resume = checkpointer.latest()
  _check_same_labels(checkpointer, resume, noisy)
  labels = {'labels': {'labels': noisy.labels, 'is_mislabeled': noisy.is_mislabeled}}
  detection = None
  if config.method == 'aul':
    detection, threshold_aum = _detection_stages(
      config, dataset, noisy, mesh, checkpointer, resume, labels, progress
    )
  final_error = detection.test_error if detection is not None else None
  if config.retrain.epochs > 0:
    items, meta, offset = labels, {}, 0
    if detection is not None:
      items = _finished_items(labels, detection.aul_state, threshold_aum)
      meta = {'aul_test_error': detection.test_error}
      offset = config.aul.epochs * (1 + _threshold_runs(config))
    stage = StageCheckpoint(checkpointer, 'retrain', offset, resume, items, meta)
    final_error = retrain_network(config, dataset, noisy, detection, mesh, progress, stage)
  return detection, final_error


def _data_devices(num_devices: int) -> list:
  """The devices of the data axis: all of them across processes, or the first few locally."""
  if num_devices == jax.device_count():
    return jax.devices()
  if jax.process_count() > 1:
    raise UserInputError(
      f'num_devices={num_devices}: a run over {jax.process_count()} processes uses all '
      f'{jax.device_count()} devices (num_devices=0)'
    )
  if num_devices > jax.local_device_count():
    raise UserInputError(f'num_devices={num_devices}; only {jax.local_device_count()} available')
  return jax.local_devices()[:num_devices]


def run(
  config: ml_collections.ConfigDict, workdir: str, log: Log = logging.info, force: bool = False
) -> dict:
  """Runs the configured pipeline and writes scores.csv and summary.json into `workdir`.

  Method 'aul' runs detection (steps 1-2) and, if retrain.epochs > 0, the weighted retraining
  (step 3); the baselines skip detection and only retrain. Bad configs and data raise
  UserInputError before training starts, and nothing is written unless the run completes.
  Rerunning on the same workdir resumes from its checkpoints; a finished run is not redone.
  `force` continues a run whose stored config differs from `config`.
  """
  start = time.time()
  num_devices = config.num_devices or jax.device_count()
  config_lib.validate(config, num_devices)
  config_lib.check_workdir(workdir)
  finished = _finished_summary(workdir, config, force)
  if finished is not None:
    log(f'the run in {workdir} is already complete; nothing to do')
    return finished
  mesh = train.make_mesh(_data_devices(num_devices))
  dataset = data.load_dataset(config.data)
  noisy = inject_noise(dataset, config.noise)
  config_lib.validate_for_data(config, noisy.injected)
  if _threshold_runs(config) and config.method == 'aul':
    _threshold_sets(config, noisy, dataset.num_classes)  # Do they fit? Fail before training.
  log(
    f'{dataset.name}: {len(noisy.labels)} training examples, {dataset.num_classes} classes, '
    f'{num_devices} device(s); noise {config.noise.kind} at {config.noise.rate}'
  )
  primary = distributed.is_primary()
  progress = progress_lib.Progress(
    log,
    workdir=workdir if config.tensorboard and primary else None,
    interactive=None if primary else False,
    log_every_epochs=config.log_every_epochs,
  )
  with progress, checkpointing.Checkpointer(workdir, config, force=force) as checkpointer:
    detection, final_error = _train_and_detect(config, dataset, noisy, mesh, checkpointer, progress)
  scores, summary = _outputs(config, dataset, noisy, detection, final_error)
  summary.update(
    {
      'config': config.to_dict(),
      'versions': package_versions(),
      'devices': [str(d) for d in mesh.devices.flat],
      'wall_time_s': time.time() - start,
    }
  )
  history = None
  if detection is not None and detection.aul_state.history_TxN is not None:
    history = train.to_host(detection.aul_state.history_TxN)
  pictures = None
  if detection is not None:
    # The paper's figures show the AUL and its global mixture, whichever detector ran.
    paper = detectors.global_mixture(
      detection.aul_state.aul_N,
      max_iter=config.gmm.max_iter,
      tol=config.gmm.tol,
      n_init=config.gmm.n_init,
    )
    mixture = train.to_host(paper.mixture)
    pictures = _figures(dataset, noisy, scores['aul'], mixture, history)
  extra = None if detection is None else {'ranked_issues.csv': report.ranked_issues(scores)}
  if primary:
    outputs.write_run_outputs(workdir, scores, summary, history, pictures, extra)
  log(
    f'{config.method}: '
    + ', '.join(
      f'{k} {summary[k]:.4f}'
      for k in ('noise_estimate', 'auroc', 'f1', 'test_error')
      if isinstance(summary.get(k), float)
    )
    + f'; outputs in {workdir}'
  )
  return summary
