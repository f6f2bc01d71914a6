"""The AUL method end to end, as `launch.py` runs it.

`run` reads as the method: check the config, load the data, corrupt its labels, train the
detection network(s) (step 1, paper Section 3), run the detector (step 2, Section 4.1),
retrain from scratch with the clean probabilities as weights (step 3, Section 4.2), write the
outputs. Each step is a function below `run`, in the order it runs. Resuming is the business
of `aul_jax.checkpointing`: each training stage saves its epochs and, once finished, an
artifact that the later steps read, so a rerun skips what is done.
"""

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import time
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
from aul_jax import dynamics as dynamics_lib
from aul_jax import progress as progress_lib
from aul_jax import workdir as workdir_lib
from aul_jax.errors import UserInputError

_VERSIONED_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'scikit-learn')


@dataclasses.dataclass(frozen=True)
class NoisyLabels:
  labels: np.ndarray  # (N,) int32 labels the model is trained on.
  true_labels: np.ndarray  # (N,) int32 true labels, as far as they are known.
  is_mislabeled: np.ndarray  # (N,) bool: labels != true_labels.
  # True for injected noise, or given labels with true ones beside them (data.clean_label_key);
  # False for noise.kind == 'none' on labels taken as true: the truth is then unknown.
  truth_known: bool

  @property
  def truth(self) -> np.ndarray | None:
    """The mislabeled mask if we know it, else None."""
    return self.is_mislabeled if self.truth_known else None

  def noise_rate(self, configured: float) -> float:
    """The noise rate a baseline may assume (co-teaching's forget rate): the configured
    synthetic rate, or the real noise's measured rate."""
    return float(self.is_mislabeled.mean()) if self.truth_known and not configured else configured


@dataclasses.dataclass(frozen=True)
class Dynamics:
  """Step 1's artifact: what the detection networks measured of every example.

  With R trials (config.trials) every (N,) statistic is the mean over the trials, each
  trial's own is in `trial_statistics`, (R, N); with one, `trial_statistics` is None.
  """

  statistics: dict[str, np.ndarray]  # `aul.statistics` of the AUL run, (N,) float32 each.
  history_NxT: np.ndarray | None  # The AUL run's per-epoch losses, if recorded.
  test_error: float | None  # Of the network trained for the AUL (mean over trials).
  extra: dict[str, np.ndarray]  # The threshold runs' (R, N) 'threshold_aum', 'is_threshold'.
  trial_statistics: dict[str, np.ndarray] | None = None
  trial_history_RxNxT: np.ndarray | None = None
  trial_test_errors: list[float] | None = None


@dataclasses.dataclass(frozen=True)
class Detection:
  """Step 2's result: the configured detector's verdict and the paper's, on the dynamics.

  With detector.rounds = 2 the verdict is round 2's, whose network left out the examples
  that round 1 (`first_round`) flagged; the paper's verdict is always on round 1's AUL run,
  which trained on every example as the paper's does.
  """

  dynamics: Dynamics  # Of the round the verdict judges.
  verdict: detectors.Verdict
  paper: detectors.Verdict  # The AUL and one mixture (Section 4.1), whichever detector ran.
  first_round: 'Detection | None' = None

  @property
  def aul_run(self) -> Dynamics:
    """The dynamics of the run on every example: the paper's AUL run, which figures show."""
    return self.dynamics if self.first_round is None else self.first_round.dynamics

  @property
  def left_out_N(self) -> np.ndarray | None:
    """(N,) bool: the examples round 2 left out of its loss, or None for one round."""
    return None if self.first_round is None else self.first_round.verdict.flagged_N


@dataclasses.dataclass(frozen=True)
class Job:
  """Networks to train from scratch: on which labels and weights, with which recipe.

  One network for a single key; R trials, in one program, for an (R,) array of keys. The
  labels and weights are (N,), shared by the trials, or (R, N), one row per trial.
  """

  stage: str  # The checkpointed stage, also the progress label: 'aul', 'retrain', ...
  recipe: ml_collections.ConfigDict  # config.aul or config.retrain.
  labels_N: np.ndarray
  weights_N: np.ndarray
  key: jax.Array
  num_classes: int
  method: str = 'standard'
  method_options: dict = dataclasses.field(default_factory=dict)
  history_dtype: str | None = None  # Record the per-epoch losses in this dtype.
  truth_N: np.ndarray | None = None  # With the truth, the AUL's AUROC is logged per epoch.

  @property
  def trials(self) -> int:
    """R, or 0 for a single network without a trial axis."""
    return self.key.shape[0] if self.key.ndim else 0


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
  model: Any
  state: Any  # A TrainState, or a pair of them for co-teaching; (R, ...) leaves with trials.
  aul_state: aul.AULState  # On the device.
  trials: int  # R, or 0 without a trial axis.


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  log: progress_lib.Log = logging.info,
  force: bool = False,
) -> dict:
  """Runs the configured pipeline and writes its outputs into `workdir`; returns the summary.

  Method 'aul' runs detection (steps 1-2) and, if retrain.epochs > 0, the weighted retraining
  (step 3); the baselines skip detection and only retrain. Bad configs and data raise
  UserInputError before training starts, and nothing is written unless the run completes.
  Rerunning on the same workdir resumes from its checkpoints; a finished run is not redone.
  `force` continues a run whose stored config differs from `config`.
  """
  start = time.time()
  mesh = check_config(config, workdir)
  with workdir_lib.held(workdir, 'a training run', primary=distributed.is_primary()):
    workdir_lib.refuse_other_kind(workdir, 'training')
    finished = finished_summary(workdir, config, force, log)
    if finished is not None:
      log(f'the run in {workdir} is already complete; nothing to do')
      return finished
    dataset = load_data(config.data)
    noisy = inject_noise(dataset, config.noise)
    check_against_data(config, dataset, noisy)
    log(
      f'{dataset.name}: {len(noisy.labels)} training examples, {dataset.num_classes} classes, '
      f'{mesh.size} device(s); {describe_noise(config, noisy)}'
    )
    with (
      make_progress(config, workdir, log) as progress,
      checkpointing.Run(
        workdir, config, plan_stages(config), log=progress.log, force=force
      ) as saved,
    ):
      saved.start({'labels': noisy.labels, 'is_mislabeled': noisy.is_mislabeled})
      detection = None
      if config.method == 'aul':
        dynamics = train_for_dynamics(config, dataset, noisy, mesh, saved, progress)
        detection = detect(config, dynamics, noisy, dataset.num_classes)
        if config.detector.rounds == 2:
          dynamics = train_without_suspects(
            config, dataset, noisy, detection, mesh, saved, progress
          )
          detection = detect(config, dynamics, noisy, dataset.num_classes, first_round=detection)
      final_error = retrain_from_scratch(config, dataset, noisy, detection, mesh, saved, progress)
    summary = write_outputs(config, workdir, dataset, noisy, detection, final_error, mesh, start)
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


# ------------------------------------------------------------------------ checks and data


def check_config(config: ml_collections.ConfigDict, workdir: str) -> jax.sharding.Mesh:
  """Every check that needs no data, before any work; returns the mesh of the data axis."""
  models.get_model(config.model.name, 2)  # Raises the zoo's own error listing known names.
  retrain.check_method(config.method)
  try:
    detectors.check(config.detector.statistic, config.detector.rule)
  except ValueError as error:
    raise UserInputError(
      f'detector.statistic={config.detector.statistic!r} with '
      f'detector.rule={config.detector.rule!r}: {error}'
    ) from None
  devices = _data_devices(config.num_devices)
  config_lib.validate(config, len(devices))
  config_lib.check_workdir(workdir)
  return train.make_mesh(devices)


def _data_devices(num_devices) -> list:
  """The devices of the data axis: all of them across processes, or the first few locally."""
  if not (isinstance(num_devices, int) and not isinstance(num_devices, bool) and num_devices >= 0):
    raise UserInputError(f'num_devices={num_devices!r}; expected an integer >= 0 (0: all)')
  if num_devices in (0, jax.device_count()):
    return jax.devices()
  if jax.process_count() > 1:
    raise UserInputError(
      f'num_devices={num_devices}: a run over {jax.process_count()} processes uses all '
      f'{jax.device_count()} devices (num_devices=0)'
    )
  if num_devices > jax.local_device_count():
    raise UserInputError(
      f'num_devices={num_devices}, but this machine has only {jax.local_device_count()} '
      'device(s); use num_devices=0 for all of them'
    )
  return jax.local_devices()[:num_devices]


def finished_summary(workdir: str, config, force: bool, log: progress_lib.Log) -> dict | None:
  """The summary of a complete run in `workdir` made with this config, else None.

  A run whose summary lists outputs that are missing is not complete: its finished stages
  are read back and its outputs written again.
  """
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      summary = json.load(f)
    stored_config = summary['config']
  except (OSError, ValueError, KeyError, TypeError):
    raise UserInputError(
      f'{path} is not the summary of an aul_jax run (damaged, or written by another tool); '
      'use a new --workdir, or delete it to rerun'
    ) from None
  checkpointing.require_same_config(stored_config, config, f'the finished run in {workdir}', force)
  missing = [n for n in summary.get('outputs', []) if not os.path.exists(os.path.join(workdir, n))]
  if missing:
    log(f'the finished run in {workdir} lacks {", ".join(missing)}; writing its outputs again')
    return None
  return None if force else summary


def load_data(data_config: ml_collections.ConfigDict) -> data.Dataset:
  """The configured data set (`config.data`), checked and normalised."""
  return data.load_dataset(
    data_config.name,
    path=data_config.path,
    data_dir=data_config.data_dir,
    test_fraction=data_config.test_fraction,
    split_seed=data_config.split_seed,
    label_key=data_config.label_key,
    clean_label_key=data_config.clean_label_key,
  )


def inject_noise(dataset: data.Dataset, noise_config: ml_collections.ConfigDict) -> NoisyLabels:
  """Corrupts the training labels as configured, keeping the ground-truth mask; labels that
  are noisy already (with true ones beside them) are taken as they are."""
  if dataset.y_train_clean is not None:
    config_lib.check_real_noise(noise_config.kind)
    clean = dataset.y_train_clean
    return NoisyLabels(dataset.y_train, clean, dataset.y_train != clean, truth_known=True)
  labels, is_mislabeled = noise.corrupt_labels(
    dataset.y_train, dataset.num_classes, noise_config.kind, noise_config.rate, noise_config.seed
  )
  return NoisyLabels(labels, dataset.y_train, is_mislabeled, noise_config.kind != 'none')


def describe_noise(config, noisy: NoisyLabels) -> str:
  """The noise of this run in a few words, for the log."""
  if noisy.truth_known and config.noise.kind == 'none':
    rate = noisy.is_mislabeled.mean()
    return (
      f'labels {config.data.label_key!r}, {rate:.1%} wrong against {config.data.clean_label_key!r}'
    )
  return f'noise {config.noise.kind} at {config.noise.rate}'


def check_against_data(config, dataset: data.Dataset, noisy: NoisyLabels) -> None:
  """The checks that need the data, before any training: the model takes the images, the
  oracle knows the truth, the threshold samples fit."""
  models.check_images(config.model.name, dataset.x_train.shape[1:], dataset.num_classes)
  config_lib.validate_for_data(config, noisy.truth_known)
  if _threshold_runs(config):
    _threshold_sets(config, noisy, dataset.num_classes)


def make_progress(config, workdir: str, log: progress_lib.Log) -> progress_lib.Progress:
  """Progress of the training stages: shown and recorded by the primary process only."""
  primary = distributed.is_primary()
  return progress_lib.Progress(
    log,
    workdir=workdir if config.tensorboard and primary else None,
    interactive=None if primary else False,
    log_every_epochs=config.log_every_epochs,
  )


def plan_stages(config) -> list[tuple[str, int]]:
  """The training stages this config runs, in order, with their epochs."""
  stages = []
  if config.method == 'aul':
    stages.append(('aul', config.aul.epochs))
    if _threshold_runs(config):
      stages.append(('threshold', config.aul.epochs))
    if config.detector.rounds == 2:
      stages.append(('round2', config.aul.epochs))
  if config.retrain.epochs > 0:
    stages.append(('retrain', config.retrain.epochs))
  return stages


# ------------------------------------------------------------------ step 1: training dynamics


def train_for_dynamics(config, dataset, noisy: NoisyLabels, mesh, saved, progress) -> Dynamics:
  """Step 1: every example's AUL and other training dynamics from the AUL run (the mean over
  config.trials networks), its test error and, for the threshold rule, the AUM of the
  threshold-sample runs."""
  num_examples = len(noisy.labels)
  job = Job(
    stage='aul',
    recipe=config.aul,
    labels_N=noisy.labels,
    weights_N=np.ones(num_examples, np.float32),
    key=trial_keys(config.seed, config.trials),
    num_classes=dataset.num_classes,
    history_dtype=config.aul.history_dtype if config.aul.record_history else None,
    truth_N=noisy.truth,
  )
  dynamics = _dynamics(config, job, dataset, mesh, saved, progress)
  if not _threshold_runs(config):
    return dynamics
  extra = _threshold_statistics(config, dataset, noisy, mesh, saved, progress)
  return dataclasses.replace(dynamics, extra=extra)


def train_without_suspects(
  config, dataset, noisy: NoisyLabels, first: Detection, mesh, saved, progress
) -> Dynamics:
  """Round 2 of step 1: the detection network(s) trained again from scratch, with the
  examples round 1 flagged at weight 0. They are still measured every epoch, so their
  statistics are out of sample, while the rest are measured by a network that fitted
  fewer noisy labels than round 1's."""
  suspects_N = first.verdict.flagged_N
  progress.log(f'round 2: training without the {int(suspects_N.sum())} examples round 1 flagged')
  recipe = config.aul.copy_and_resolve_references()
  if config.detector.round2_clip_grad_norm > 0:
    recipe.clip_grad_norm = config.detector.round2_clip_grad_norm
  job = Job(
    stage='round2',
    recipe=recipe,
    labels_N=noisy.labels,
    weights_N=(~suspects_N).astype(np.float32),
    key=stage_keys(config, 2),
    num_classes=dataset.num_classes,
    truth_N=noisy.truth,
  )
  return _dynamics(config, job, dataset, mesh, saved, progress)


def _dynamics(config, job: Job, dataset, mesh, saved, progress) -> Dynamics:
  """A detection stage's Dynamics: its artifact, trained now or read back, with the trial
  means as the statistics and each trial's own beside them."""
  results = _stage_results(
    saved, job, lambda: _dynamics_results(config, job, dataset, mesh, saved, progress)
  )
  statistics = {k.removeprefix('stat_'): v for k, v in results.items() if k.startswith('stat_')}
  history, errors = results.get('history_NxT'), results['test_error']
  if not job.trials:
    return Dynamics(statistics, history, _optional(errors), extra={})
  return Dynamics(
    statistics=jax.tree.map(np.asarray, dynamics_lib.combine_trials(statistics)),
    history_NxT=None if history is None else history.mean(axis=0),
    test_error=_optional(np.mean(errors)),
    extra={},
    trial_statistics=statistics,
    trial_history_RxNxT=history,
    trial_test_errors=[_optional(e) for e in errors],
  )


def trial_keys(seed: int, trials: int) -> jax.Array:
  """The key of one network (trials == 1), or of each trial: trial r trains with seed + r,
  so trial 0 is the run of one network and trial r that of `seed + r`."""
  if trials == 1:
    return jax.random.key(seed)
  return jnp.stack([jax.random.key(seed + r) for r in range(trials)])


def stage_keys(config, stage: int) -> jax.Array:
  """The keys of a later stage's fresh network(s): each trial's key folded with `stage`
  (1: retraining, 2: the second detection round), so no stage repeats another's draws."""
  fold = lambda key: jax.random.fold_in(key, stage)  # noqa: E731
  return train.over_trials(fold, config.trials > 1)(trial_keys(config.seed, config.trials))


def _stage_results(saved, job: Job, train_stage) -> dict[str, np.ndarray]:
  """A stage's artifact: read back if the stage finished before, else trained now (and
  saved, unless `saved` is None: benchmarks train without checkpoints)."""
  if saved is None:
    return train_stage()
  results = saved.finished(job.stage)
  return results if results is not None else saved.finish(job.stage, train_stage())


def _dynamics_results(config, job: Job, dataset, mesh, saved, progress) -> dict:
  """Trains `job` and returns its artifact: statistics, history and test error."""
  network = train_network(config, job, dataset, mesh, saved, progress)
  statistics = train.host_statistics(network.aul_state, network.trials)
  results = {f'stat_{name}': value for name, value in statistics.items()}
  history_NxT = train.host_history(network.aul_state)
  if history_NxT is not None:
    results['history_NxT'] = history_NxT
  errors = test_errors(config, network, dataset, mesh)
  progress.scalar(f'{job.stage}/test_error', _mean_or_none(errors), job.recipe.epochs)
  results['test_error'] = errors
  return results


def _mean_or_none(errors: np.ndarray) -> float | None:
  return _optional(np.mean(errors))


def _optional(value) -> float | None:
  """A stored float, None where it was stored as NaN (no test split)."""
  value = float(value)
  return None if math.isnan(value) else value


def _threshold_runs(config) -> int:
  """The extra threshold-sample runs of the configured detector (0 for other rules)."""
  wanted = config.method == 'aul' and config.detector.rule in detectors.EXTRA_RUNS
  return config.detector.threshold_runs if wanted else 0


def _threshold_sets(config, noisy: NoisyLabels, num_classes: int) -> list:
  try:
    return threshold_samples.threshold_sets(
      len(noisy.labels), num_classes, config.detector.threshold_runs, config.seed
    )
  except ValueError as e:
    raise UserInputError(f'detector.threshold_runs={config.detector.threshold_runs}: {e}') from None


def _threshold_statistics(config, dataset, noisy, mesh, saved, progress) -> dict:
  """Pleiss et al.'s runs, as the trials of one program: in trial r the examples of
  threshold set r are moved to an extra class K. Returns every trial's AUM and threshold
  samples, (R, N) each."""
  num_classes, num_examples = dataset.num_classes, len(noisy.labels)
  sets = _threshold_sets(config, noisy, num_classes)
  is_threshold_RxN = np.zeros((len(sets), num_examples), bool)
  for run, indices in enumerate(sets):
    is_threshold_RxN[run, indices] = True
  base = jax.random.key(config.seed)
  job = Job(
    stage='threshold',
    recipe=config.aul,
    labels_N=np.where(is_threshold_RxN, num_classes, noisy.labels[None]).astype(np.int32),
    weights_N=np.ones(num_examples, np.float32),
    key=jnp.stack([jax.random.fold_in(base, 2 + run) for run in range(len(sets))]),
    num_classes=num_classes + 1,
  )
  results = _stage_results(
    saved, job, lambda: _aum_results(config, job, dataset, mesh, saved, progress)
  )
  return {'threshold_aum': results['aum'], 'is_threshold': is_threshold_RxN}


def _aum_results(config, job: Job, dataset, mesh, saved, progress) -> dict:
  network = train_network(config, job, dataset, mesh, saved, progress)
  return {'aum': train.host_statistics(network.aul_state, network.trials)['aum']}


def train_network(config, job: Job, dataset, mesh, saved, progress) -> TrainedNetwork:
  """Trains `job`'s fresh network with its recipe and method, resuming from and saving to
  its stage's checkpoints (none when `saved` is None)."""
  recipe, num_examples, trials = job.recipe, job.labels_N.shape[-1], job.trials
  model = models.get_model(
    config.model.name,
    job.num_classes,
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
    warmup_epochs=recipe.warmup_epochs,
    clip_grad_norm=recipe.clip_grad_norm,
    schedule=recipe.schedule,
    num_epochs=recipe.epochs,
  )
  keys = train.over_trials(jax.random.split, trials)(job.key)
  init_key, train_key = keys[..., 0], keys[..., 1]
  step, init_state = retrain.step_and_init(
    job.method,
    model,
    optimizer,
    lambda k: train.create_train_state(model, optimizer, dataset.x_train.shape[1:], k),
    **job.method_options,
  )
  state = train.over_trials(init_state, trials)(init_key)
  train_data = {
    'label': job.labels_N.astype(np.int32),
    'weight': np.asarray(job.weights_N, np.float32),
  }
  epoch_options = {
    'num_examples': num_examples,
    'batch_size': recipe.batch_size,
    'augment_images': dataset.augment,
    'draw_weights': retrain.draw_weights(job.method),
    'trials': trials,
    'trial_fields': tuple(name for name, value in train_data.items() if value.ndim == 2),
  }
  if config.data.input == 'stream':
    load_images = dataset.x_train.__getitem__
    run_epoch = train.make_streamed_train_epoch(step, mesh, load_images, **epoch_options)
  else:
    run_epoch = train.make_train_epoch(step, mesh, **epoch_options)
    train_data['image'] = dataset.x_train
  if job.truth_N is not None:
    train_data['is_mislabeled'] = np.asarray(job.truth_N, bool)
  state = train.replicate(state, mesh)
  aul_state = train.init_aul_state(
    mesh, num_examples, recipe.epochs, job.history_dtype, trials=trials
  )
  with saved.stage(job.stage) if saved is not None else contextlib.nullcontext() as stage:
    start_epoch, step_offset = 0, 0
    if stage is not None:
      state, aul_state, start_epoch = stage.restore(state, aul_state)
      step_offset = stage.step_offset
    progress.start_stage(job.stage, recipe.epochs, start_epoch, step_offset)
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
      checkpoint=stage,
    )
    progress.end_stage()
  return TrainedNetwork(model, retrain.evaluated_state(state), aul_state, trials)


def test_errors(config, network: TrainedNetwork, dataset: data.Dataset, mesh) -> np.ndarray:
  """Fraction of test examples misclassified, () or (R,) per trial; NaN when the data set
  has no test split."""
  num_test = len(dataset.y_test)
  if num_test == 0:
    return np.full((network.trials,) if network.trials else (), np.nan)
  evaluate = train.make_evaluate(
    network.model,
    mesh,
    num_examples=num_test,
    batch_size=config.eval_batch_size,
    trials=network.trials,
  )
  images, labels = train.replicate((dataset.x_test, dataset.y_test.astype(np.int32)), mesh)
  return 1.0 - np.asarray(evaluate(network.state, images, labels), np.float64) / num_test


# --------------------------------------------------------------------------- step 2: detector


def detect(
  config,
  dynamics: Dynamics,
  noisy: NoisyLabels,
  num_classes: int,
  first_round: Detection | None = None,
) -> Detection:
  """Step 2: the configured detector on the dynamics, and the paper's (the AUL and one
  mixture, on the AUL run of round 1), which the figures show and the summary reports
  beside it."""
  verdict = detectors.detect(
    {**dynamics.statistics, **dynamics.extra},
    noisy.labels,
    num_classes,
    statistic=config.detector.statistic,
    rule=config.detector.rule,
    threshold_percentile=config.detector.threshold_percentile,
    mixture=config.gmm,
  )
  if first_round is None:
    paper = train.to_host(detectors.global_mixture(dynamics.statistics['aul'], **config.gmm))
  else:
    paper = first_round.paper
  return Detection(dynamics, train.to_host(verdict), paper, first_round)


# ------------------------------------------------------------------------- step 3: retraining


def retrain_from_scratch(
  config, dataset, noisy: NoisyLabels, detection: Detection | None, mesh, saved, progress
) -> float | None:
  """Step 3 (or a baseline): a fresh network trained with the method's weights; returns its
  test error (without retraining, the AUL network's)."""
  if config.retrain.epochs == 0:
    return detection.dynamics.test_error if detection is not None else None
  p_N = None if detection is None else detection.verdict.p_mislabeled_N
  job = Job(
    stage='retrain',
    recipe=config.retrain,
    labels_N=noisy.labels,
    weights_N=retrain.example_weights(config.method, p_N, noisy.is_mislabeled),
    key=stage_keys(config, 1),
    num_classes=dataset.num_classes,
    method=config.method,
    method_options=retrain.method_options(config.retrain, noisy.noise_rate(config.noise.rate)),
  )

  def train_stage():
    progress.log(f'retraining from scratch with method {config.method!r}')
    network = train_network(config, job, dataset, mesh, saved, progress)
    errors = test_errors(config, network, dataset, mesh)
    progress.scalar('retrain/test_error', _mean_or_none(errors), config.retrain.epochs)
    return {'test_error': errors}

  return _mean_or_none(_stage_results(saved, job, train_stage)['test_error'])


# ---------------------------------------------------------------------------------- outputs


def write_outputs(
  config, workdir, dataset, noisy: NoisyLabels, detection, final_error, mesh, start
) -> dict:
  """scores.csv, summary.json, ranked_issues.csv, the history and the paper's figures."""
  fields = {
    'method': config.method,
    'num_classes': dataset.num_classes,
    'test_error': final_error,
  }
  statistics = verdict = paper = history = None
  if detection is not None:
    statistics, verdict, paper = detection.aul_run.statistics, detection.verdict, detection.paper
    history = detection.aul_run.history_NxT
    fields['aul_model_test_error'] = detection.aul_run.test_error
  scores, summary, tables = report.assemble(
    num_examples=len(noisy.labels),
    labels_N=noisy.labels,
    statistics=statistics,
    verdict=verdict,
    detector=_detector_summary(config),
    paper=paper,
    true_labels_N=noisy.true_labels if noisy.truth_known else None,
    is_mislabeled_N=noisy.truth,
    **fields,
  )
  if detection is not None and detection.first_round is not None:
    # The AUL run's statistics are the columns the paper's figures and mixture read; the
    # second round's, which the detector judged, come beside them.
    scores['left_out'] = detection.left_out_N
    scores.update(report.statistic_columns(detection.dynamics.statistics, 'round2_'))
    summary['rounds'] = [
      report.round_summary(d.verdict, noisy.truth, test_error=d.dynamics.test_error)
      for d in (detection.first_round, detection)
    ]
  arrays = {}
  if detection is not None and detection.aul_run.trial_statistics is not None:
    dynamics = detection.aul_run
    tables.update(report.trial_tables(dynamics.trial_statistics))
    summary['trials'] = report.trials_summary(
      dynamics.trial_statistics, dynamics.trial_test_errors, noisy.truth
    )
    if dynamics.trial_history_RxNxT is not None:
      for r, history_NxT in enumerate(dynamics.trial_history_RxNxT):
        arrays[f'trials/aul_history_trial{r}.npy'] = history_NxT.astype(np.float32)
  summary.update(
    {
      'config': config.to_dict(),
      'versions': package_versions(),
      'devices': [str(d) for d in mesh.devices.flat],
      'wall_time_s': time.time() - start,
    }
  )
  pictures = None
  if detection is not None:
    pictures = figures.run_figures(
      aul_N=statistics['aul'],
      mixture=paper.mixture,
      is_mislabeled_N=noisy.truth,
      history_NxT=history,
      images_NxHxWxC=dataset.x_train,
      labels_N=noisy.labels,
      true_labels_N=noisy.true_labels if noisy.truth_known else None,
    )
  if distributed.is_primary():
    outputs.write_run_outputs(workdir, scores, summary, history, pictures, tables, arrays)
  return summary


def _detector_summary(config) -> dict:
  """summary.json's 'detector': the statistic and rule, and the threshold rule's settings."""
  detector = {
    'statistic': config.detector.statistic,
    'rule': config.detector.rule,
    'rounds': config.detector.rounds,
  }
  if config.detector.rule == 'threshold':
    detector.update(
      threshold_runs=config.detector.threshold_runs,
      threshold_percentile=config.detector.threshold_percentile,
    )
  return detector


def package_versions() -> dict[str, str]:
  return {name: importlib.metadata.version(name) for name in _VERSIONED_PACKAGES}
