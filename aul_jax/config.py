"""The base experiment config and its validation at the boundary, before any work starts."""

import os

import ml_collections

from aul_jax import data, models, noise
from aul_jax.errors import UserInputError

METHODS = ('aul',)
HISTORY_DTYPES = ('float32', 'bfloat16', 'float16')
COMPUTE_DTYPES = ('float32', 'bfloat16')


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with the paper's CIFAR recipe as defaults (Sections 3 and 5)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Initialisation, shuffling and augmentation; the noise has its own seed.
  config.method = 'aul'
  config.data = data.default_data_config()
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
      'record_history': False,  # Keep each epoch's per-example loss: (N, T) on the device.
      'history_dtype': 'float32',
    }
  )
  config.gmm = ml_collections.ConfigDict({'max_iter': 1000, 'tol': 1e-7, 'n_init': 1})
  config.retrain = ml_collections.ConfigDict({'epochs': 0})  # 0 = detection only.
  config.eval_batch_size = 500
  config.num_devices = 0  # Local devices on the data axis; 0 = all of them.
  return config


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise UserInputError(message)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises UserInputError naming the first bad field and value of `config`."""
  _require(
    config.method in METHODS, f"unknown method '{config.method}'; known: {', '.join(METHODS)}"
  )
  rate = config.noise.rate
  _require(
    isinstance(rate, (int, float)) and 0 <= rate < 1,
    f'noise.rate={rate!r}; expected a number in [0, 1)',
  )
  noise.transition_matrix(config.noise.kind, rate, 2)  # Validates the kind against the rate.
  if config.model.name not in models.MODELS:
    models.get_model(config.model.name, 2)  # Raises the zoo's own error listing known names.
  _require(
    config.model.dtype in COMPUTE_DTYPES,
    f'model.dtype={config.model.dtype!r}; expected one of {COMPUTE_DTYPES}',
  )
  for field in ('epochs', 'batch_size'):
    value = config.aul[field]
    _require(_is_int(value) and value > 0, f'aul.{field}={value!r}; expected a positive integer')
  _require(
    config.aul.batch_size % num_devices == 0,
    f'aul.batch_size={config.aul.batch_size} is not divisible by the {num_devices} '
    'devices on the data axis',
  )
  _require(
    config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0,
    f'eval_batch_size={config.eval_batch_size}; expected a positive multiple of the '
    f'{num_devices} devices',
  )
  _require(
    config.aul.learning_rate > 0, f'aul.learning_rate={config.aul.learning_rate!r}; expected > 0'
  )
  _require(
    config.aul.history_dtype in HISTORY_DTYPES,
    f'aul.history_dtype={config.aul.history_dtype!r}; expected one of {HISTORY_DTYPES}',
  )
  _require(
    _is_int(config.retrain.epochs) and config.retrain.epochs >= 0,
    f'retrain.epochs={config.retrain.epochs!r}; expected an integer >= 0',
  )
  _require(
    config.retrain.epochs == 0,
    'retrain.epochs > 0: weighted retraining is not implemented yet (issue 4); '
    'use retrain.epochs=0 for detection only',
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
