"""The base experiment config, and the checks of its fields that need nothing but the config.

A leaf: it imports no training code, so `configs/*.py` load in milliseconds. Names that other
modules define (models, methods, detector statistics) are checked by those modules, all of
them called by `pipeline.check_config` before any work starts.
"""

import difflib
import math
import os

import ml_collections

from aul_jax import checks, noise
from aul_jax.errors import UserInputError

HISTORY_DTYPES = ('float32', 'bfloat16', 'float16')
COMPUTE_DTYPES = ('float32', 'bfloat16')
INPUT_MODES = ('device', 'stream')
# The Gaussian mixtures of the detectors and of the paper's figures: one set of settings for
# the pipeline, `aul_jax.score` and `aul_jax.find_label_issues`. 10 restarts: from one start,
# EM on the AUM stopped at a worse optimum in 1 of 3 runs of 20% pair-flip digits (noise
# estimate 0.33 instead of 0.20; docs/detection.md).
MIXTURE = {'max_iter': 1000, 'tol': 1e-7, 'n_init': 10}
# A recipe's learning-rate schedules (train.make_optimizer): the paper's drops, or a cosine.
SCHEDULES = ('step', 'cosine')


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with the paper's CIFAR recipe as defaults (Sections 3 and 5)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Initialisation, shuffling and augmentation; the noise has its own seed.
  # Networks per training stage, trained side by side in one compiled program (trial r with
  # seed + r, on the same noisy labels); the detector reads the mean of their statistics.
  config.trials = 1
  config.method = 'aul'  # Or a baseline: standard, oracle, random, reed_hard, coteaching.
  # 'digits' (scikit-learn's, split by test_fraction and split_seed), 'npz' (data.path) or
  # a TFDS name (prepared in data.data_dir).
  config.data = ml_collections.ConfigDict(
    {'name': 'digits', 'path': '', 'data_dir': '', 'test_fraction': 0.2, 'split_seed': 0}
  )
  # TFDS only: the feature trained on, and one of true labels when the data set has both
  # (CIFAR-10N: 'worse_label' and 'label'); the noise is then real and noise.kind 'none'.
  config.data.label_key = 'label'
  config.data.clean_label_key = ''
  # 'device': the training images live on the accelerator and an epoch is one compiled
  # program. 'stream': they stay in host memory and each step's batch is sent over, for
  # data sets larger than device memory.
  config.data.input = 'device'
  config.noise = ml_collections.ConfigDict({'kind': 'uniform', 'rate': 0.4, 'seed': 0})
  config.model = ml_collections.ConfigDict({'name': 'resnet32', 'dtype': 'float32'})
  # The AUL run: SGD, constant learning rate, AUL taken before any learning-rate drop.
  config.aul = ml_collections.ConfigDict(
    {
      'epochs': 150,
      'batch_size': 64,
      'learning_rate': 0.1,
      'momentum': 0.9,
      'weight_decay': 1e-4,
      'lr_drop_fractions': (),
      'lr_drop_factor': 0.1,
      'schedule': 'step',  # Or 'cosine': decay to 0 over the epochs (no lr_drop_fractions).
      'warmup_epochs': 0.0,  # Linear learning-rate warm-up (train.make_optimizer).
      'clip_grad_norm': 0.0,  # > 0: clip each step's gradient to this global norm.
      'record_history': False,  # Keep each epoch's per-example loss: (N, T) on the device.
      'history_dtype': 'float32',
    }
  )
  config.gmm = ml_collections.ConfigDict(MIXTURE)
  # Which statistic of the training run flags an example, and by which rule
  # (aul_jax/detectors.py). The paper's is 'aul' with 'gmm'. A negative AUM ('sign')
  # measured best across uniform and pair-flip noise (docs/detection.md).
  # Rule 'threshold' (Pleiss et al.'s threshold samples on the AUM) trains threshold_runs
  # more networks, each with a disjoint N/(K+1) of the examples moved to a fake class.
  # rounds=2 trains the detection network(s) once more from scratch, with the examples the
  # first round flagged left out of the loss (still measured), and judges that second run:
  # the suspects are then measured out of sample, by a network that did not fit them.
  # With many examples at weight 0, round 2 at lr 0.1 collapsed to chance on the digits and
  # Fashion-MNIST; clipping its gradients (round2_clip_grad_norm; 0: config.aul's) prevents it.
  config.detector = ml_collections.ConfigDict(
    {
      'statistic': 'aum',
      'rule': 'sign',
      'rounds': 2,
      'round2_clip_grad_norm': 1.0,
      'threshold_runs': 2,
      'threshold_percentile': 99.0,
    }
  )
  # Retraining from scratch (Section 5): 300 epochs, LR 0.1 dropped 10x at 150 and 225.
  config.retrain = ml_collections.ConfigDict(
    {
      'epochs': 0,  # 0 = detection only.
      'batch_size': 64,
      'learning_rate': 0.1,
      'momentum': 0.9,
      'weight_decay': 1e-4,
      'lr_drop_fractions': (0.5, 0.75),  # Of retrain.epochs: 150 and 225 of 300.
      'lr_drop_factor': 0.1,
      'schedule': 'step',
      'warmup_epochs': 0.0,
      'clip_grad_norm': 0.0,
      'reed_beta': 0.8,  # reed_hard: weight of the given label in the bootstrapped target.
      'coteaching_forget_rate': -1.0,  # < 0: the (known) noise rate, as Han et al. assume.
      'coteaching_gradual_fraction': 0.05,  # The forget rate ramps up over 10 of 200 epochs.
    }
  )
  # Checkpoints in WORKDIR/checkpoints: every N epochs (0: only at the end of each stage
  # and when SIGTERM/SIGINT arrives). Rerunning the same command resumes.
  config.checkpoint = ml_collections.ConfigDict({'every_epochs': 10, 'max_to_keep': 2})
  # Several processes (hosts): explicit, or detected under SLURM / on a Cloud TPU pod.
  config.distributed = ml_collections.ConfigDict(
    {
      'coordinator_address': '',  # e.g. 'host0:1234'; '' = not explicit.
      'num_processes': 1,
      'process_id': 0,
      'auto_detect': True,
    }
  )
  config.eval_batch_size = 500
  config.tensorboard = True  # Summaries in WORKDIR/tensorboard (process 0 only).
  config.log_every_epochs = 1  # Log lines when not on a terminal (a bar is shown there).
  config.num_devices = 0  # Devices on the data axis, over all processes; 0 = all of them.
  return config


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise UserInputError(message)


def _is_finite_number(value) -> bool:
  return checks.is_number(value) and math.isfinite(value)


def check_fields(config, where: str = 'the config') -> None:
  """The fields of `config` are those of `base_config()`: a missing one (a config not built
  from it) or an unknown one (a misspelling in a config file, which would be ignored) is
  refused, with the nearest known names."""
  _require(
    isinstance(config, ml_collections.ConfigDict),
    f'{where} is a {type(config).__name__}; expected an ml_collections.ConfigDict '
    'built from aul_jax.config.base_config()',
  )
  _check_fields(config, base_config(), '', where)


def nearest_fields(name: str, section, prefix: str = '') -> str:
  """'did you mean aul.epochs? (aul has: ...)' for a `name` that `section` (whose fields
  are named `prefix` + field) does not have."""
  fields = sorted(section)
  near = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
  hint = f'did you mean {", ".join(prefix + n for n in near)}? ' if near else ''
  return f'{hint}({prefix.rstrip(".") or "the config"} has: {", ".join(fields)})'


def _check_fields(config, reference, prefix: str, where: str) -> None:
  for name in reference:
    _require(
      name in config,
      f'{where} lacks the field {prefix}{name}; build it from aul_jax.config.base_config()',
    )
  for name in config:
    if name not in reference:
      raise UserInputError(
        f'{where} has the field {prefix}{name}, which aul_jax does not read; '
        + nearest_fields(name, reference, prefix)
      )
    if isinstance(reference[name], ml_collections.ConfigDict):
      _require(
        isinstance(config[name], ml_collections.ConfigDict),
        f'{where}: {prefix}{name} is {config[name]!r}; expected a section with fields '
        f'{", ".join(sorted(reference[name]))}',
      )
      _check_fields(config[name], reference[name], f'{prefix}{name}.', where)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises UserInputError naming the first bad field and value of `config`."""
  check_fields(config)
  _require(
    checks.is_int(config.trials) and config.trials >= 1,
    f'trials={config.trials!r}; expected an integer >= 1',
  )
  rate = config.noise.rate
  _require(
    checks.is_number(rate) and 0 <= rate < 1, f'noise.rate={rate!r}; expected a number in [0, 1)'
  )
  noise.transition_matrix(config.noise.kind, rate, 2)  # Validates the kind against the rate.
  if config.data.clean_label_key:
    check_real_noise(config.noise.kind)
  _require(
    config.model.dtype in COMPUTE_DTYPES,
    f'model.dtype={config.model.dtype!r}; expected one of {COMPUTE_DTYPES}',
  )
  _validate_detector(config.detector)
  _validate_mixture(config.gmm)
  _validate_recipe(config.aul, 'aul', num_devices, min_epochs=1)
  _validate_recipe(config.retrain, 'retrain', num_devices, min_epochs=0)
  _validate_checkpoint(config.checkpoint)
  _require(
    config.data.input in INPUT_MODES,
    f'data.input={config.data.input!r}; expected one of {INPUT_MODES}',
  )
  validate_distributed(config.distributed)
  _require(
    checks.is_int(config.eval_batch_size)
    and config.eval_batch_size > 0
    and config.eval_batch_size % num_devices == 0,
    f'eval_batch_size={config.eval_batch_size!r}; expected a positive multiple of the '
    f'{num_devices} devices',
  )
  _require(
    config.aul.history_dtype in HISTORY_DTYPES,
    f'aul.history_dtype={config.aul.history_dtype!r}; expected one of {HISTORY_DTYPES}',
  )
  _require(
    config.method == 'aul' or config.retrain.epochs > 0,
    f"method '{config.method}' trains a network from scratch: set retrain.epochs > 0",
  )
  _require(
    _is_finite_number(config.retrain.reed_beta) and 0 < config.retrain.reed_beta <= 1,
    f'retrain.reed_beta={config.retrain.reed_beta!r}; expected a number in (0, 1]',
  )
  _require(
    _is_finite_number(config.retrain.coteaching_forget_rate)
    and config.retrain.coteaching_forget_rate < 1,
    f'retrain.coteaching_forget_rate={config.retrain.coteaching_forget_rate!r}; expected < 1',
  )


def _validate_detector(detector) -> None:
  _require(
    _is_finite_number(detector.round2_clip_grad_norm) and detector.round2_clip_grad_norm >= 0,
    f'detector.round2_clip_grad_norm={detector.round2_clip_grad_norm!r}; expected a finite '
    'number >= 0 (0 = as config.aul)',
  )
  _require(
    checks.is_int(detector.rounds) and detector.rounds in (1, 2),
    f'detector.rounds={detector.rounds!r}; expected 1 or 2',
  )
  _require(
    not (detector.rounds == 2 and detector.rule == 'threshold'),
    'detector.rounds=2 with rule threshold: the threshold-sample runs are the extra runs of '
    'that rule; set detector.rounds=1 or pick another rule',
  )
  _require(
    checks.is_int(detector.threshold_runs) and detector.threshold_runs >= 2,
    f'detector.threshold_runs={detector.threshold_runs!r}; expected an integer >= 2 (each '
    'example must keep its label in at least one run)',
  )
  _require(
    _is_finite_number(detector.threshold_percentile) and 0 < detector.threshold_percentile <= 100,
    f'detector.threshold_percentile={detector.threshold_percentile!r}; expected (0, 100]',
  )


def _validate_mixture(mixture) -> None:
  for name in ('max_iter', 'n_init'):
    _require(
      checks.is_int(mixture[name]) and mixture[name] >= 1,
      f'gmm.{name}={mixture[name]!r}; expected an integer >= 1',
    )
  _require(
    _is_finite_number(mixture.tol) and mixture.tol >= 0,
    f'gmm.tol={mixture.tol!r}; expected a number >= 0',
  )


def _validate_checkpoint(checkpoint) -> None:
  _require(
    checks.is_int(checkpoint.every_epochs) and checkpoint.every_epochs >= 0,
    f'checkpoint.every_epochs={checkpoint.every_epochs!r}; expected an integer >= 0',
  )
  _require(
    checks.is_int(checkpoint.max_to_keep) and checkpoint.max_to_keep >= 1,
    f'checkpoint.max_to_keep={checkpoint.max_to_keep!r}; expected an integer >= 1',
  )


def _validate_recipe(recipe, name: str, num_devices: int, min_epochs: int) -> None:
  """Checks one training recipe, `config.aul` or `config.retrain`."""
  _require(
    checks.is_int(recipe.epochs) and recipe.epochs >= min_epochs,
    f'{name}.epochs={recipe.epochs!r}; expected an integer >= {min_epochs}',
  )
  _require(
    checks.is_int(recipe.batch_size) and recipe.batch_size > 0,
    f'{name}.batch_size={recipe.batch_size!r}; expected a positive integer',
  )
  _require(
    recipe.batch_size % num_devices == 0,
    f'{name}.batch_size={recipe.batch_size} is not divisible by the {num_devices} '
    'devices on the data axis',
  )
  _require(
    _is_finite_number(recipe.learning_rate) and recipe.learning_rate > 0,
    f'{name}.learning_rate={recipe.learning_rate!r}; expected a finite number > 0',
  )
  _require(
    _is_finite_number(recipe.momentum) and 0 <= recipe.momentum < 1,
    f'{name}.momentum={recipe.momentum!r}; expected a number in [0, 1)',
  )
  _require(
    _is_finite_number(recipe.weight_decay) and recipe.weight_decay >= 0,
    f'{name}.weight_decay={recipe.weight_decay!r}; expected a finite number >= 0',
  )
  _require(
    _is_finite_number(recipe.lr_drop_factor) and 0 < recipe.lr_drop_factor <= 1,
    f'{name}.lr_drop_factor={recipe.lr_drop_factor!r}; expected a number in (0, 1]',
  )
  for field in ('warmup_epochs', 'clip_grad_norm'):
    _require(
      _is_finite_number(recipe[field]) and recipe[field] >= 0,
      f'{name}.{field}={recipe[field]!r}; expected a finite number >= 0 (0 = off)',
    )
  _require(
    recipe.schedule in SCHEDULES,
    f'{name}.schedule={recipe.schedule!r}; expected {" or ".join(map(repr, SCHEDULES))}',
  )
  fractions = tuple(recipe.lr_drop_fractions)
  _require(
    not (recipe.schedule == 'cosine' and fractions),
    f'{name}.schedule=cosine decays the rate by itself: set {name}.lr_drop_fractions=() '
    "or use schedule 'step'",
  )
  _require(
    all(_is_finite_number(f) and 0 < f < 1 for f in fractions),
    f'{name}.lr_drop_fractions={fractions!r}; expected fractions in (0, 1)',
  )


def validate_distributed(distributed: ml_collections.ConfigDict) -> None:
  """The `distributed` section, checked before `distributed.initialize` joins the others."""
  if not distributed.coordinator_address:
    return
  _require(
    checks.is_int(distributed.num_processes)
    and checks.is_int(distributed.process_id)
    and distributed.num_processes >= 1
    and 0 <= distributed.process_id < distributed.num_processes,
    f'distributed.coordinator_address is set, so distributed.num_processes '
    f'({distributed.num_processes}) must be >= 1 and distributed.process_id '
    f'({distributed.process_id}) in 0..num_processes-1',
  )


def check_real_noise(noise_kind: str) -> None:
  """Labels with true ones beside them (data.clean_label_key) are noisy already: no
  synthetic noise goes on top."""
  _require(
    noise_kind == 'none',
    f'data.clean_label_key is set, so the labels are noisy already, but noise.kind is '
    f"{noise_kind!r}: set noise.kind='none' and noise.rate=0, or clear data.clean_label_key "
    'to add synthetic noise to the true labels',
  )


def validate_for_data(config: ml_collections.ConfigDict, truth_known: bool) -> None:
  """Checks that need the data: the oracle must know which labels are wrong."""
  _require(
    truth_known or config.method != 'oracle',
    "method 'oracle' needs to know the clean examples: injected noise (noise.kind != 'none') "
    'or true labels beside the given ones (data.clean_label_key)',
  )


def check_workdir(workdir: str) -> None:
  """Fails early if outputs could not be written to `workdir`; creates nothing."""
  _require(bool(workdir), 'a --workdir is required')
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    _require(os.path.isdir(path), f'workdir {workdir} exists and is not a directory')
  else:
    while not os.path.exists(path):
      path = os.path.dirname(path)
    _require(os.path.isdir(path), f'workdir {workdir}: {path} is not a directory')
  _require(os.access(path, os.W_OK | os.X_OK), f'workdir {workdir}: {path} is not writable')
