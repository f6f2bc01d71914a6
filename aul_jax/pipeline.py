"""The AUL pipeline: noisy labels -> AUL training run -> Gaussian mixture -> outputs.

Steps 1 and 2 of the method (paper Sections 3 and 4.1), split into named functions that
each do one thing; `run` strings them together and is what `launch.py` calls.
"""

import dataclasses
import importlib.metadata
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from aul_jax import aul, data, gmm, metrics, models, noise, outputs, train
from aul_jax import config as config_lib

_VERSIONED_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'scikit-learn')


@dataclasses.dataclass(frozen=True)
class NoisyLabels:
  labels: np.ndarray  # (N,) int32 labels the model is trained on.
  true_labels: np.ndarray  # (N,) int32 labels as the data source gave them.
  is_mislabeled: np.ndarray  # (N,) bool, known because we injected the noise.
  injected: bool  # False when noise.kind == 'none': the truth is then unknown.


@dataclasses.dataclass(frozen=True)
class AULRun:
  aul_N: jax.Array  # On the device.
  history_TxN: jax.Array | None
  test_error: float | None


def inject_noise(dataset: data.Dataset, noise_config: ml_collections.ConfigDict) -> NoisyLabels:
  """Corrupts the training labels as configured, keeping the ground-truth mask."""
  labels, is_mislabeled = noise.corrupt_labels(
    dataset.y_train, dataset.num_classes, noise_config.kind, noise_config.rate, noise_config.seed
  )
  return NoisyLabels(labels, dataset.y_train, is_mislabeled, noise_config.kind != 'none')


def train_for_aul(
  config: ml_collections.ConfigDict,
  dataset: data.Dataset,
  labels_N: np.ndarray,
  mesh: jax.sharding.Mesh,
  log: Callable[[str], None] = logging.info,
) -> AULRun:
  """Trains a fresh network on the noisy labels, accumulating every example's AUL on the device."""
  num_examples = len(labels_N)
  model = models.get_model(
    config.model.name,
    dataset.num_classes,
    bn_axis_name=train.DATA_AXIS,
    dtype=jnp.dtype(config.model.dtype),
  )
  optimizer = train.make_optimizer(
    learning_rate=config.aul.learning_rate,
    momentum=config.aul.momentum,
    weight_decay=config.aul.weight_decay,
    steps_per_epoch=math.ceil(num_examples / config.aul.batch_size),
  )
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  state = train.replicate(
    train.create_train_state(model, optimizer, dataset.x_train.shape[1:], init_key), mesh
  )
  history_dtype = config.aul.history_dtype if config.aul.record_history else None
  aul_state = train.replicate(
    aul.init_aul_state(num_examples, config.aul.epochs, history_dtype), mesh
  )
  train_data = train.replicate(
    {
      'image': dataset.x_train,
      'label': labels_N.astype(np.int32),
      'weight': np.ones(num_examples, np.float32),
    },
    mesh,
  )
  run_epoch = train.make_train_epoch(
    model,
    optimizer,
    mesh,
    num_examples=num_examples,
    batch_size=config.aul.batch_size,
    augment_images=dataset.augment,
  )
  state, aul_state = train.train_epochs(
    run_epoch,
    state,
    aul_state,
    train_data,
    train_key,
    num_epochs=config.aul.epochs,
    num_examples=num_examples,
    log=log,
  )
  error = test_error(config, model, state, dataset, mesh)
  return AULRun(aul_state.aul_N, aul_state.history_TxN, error)


def test_error(config, model, state, dataset: data.Dataset, mesh) -> float | None:
  """Fraction of test examples misclassified; None when the data set has no test split."""
  num_test = len(dataset.y_test)
  if num_test == 0:
    return None
  evaluate = train.make_evaluate(
    model, mesh, num_examples=num_test, batch_size=config.eval_batch_size
  )
  images, labels = train.replicate((dataset.x_test, dataset.y_test.astype(np.int32)), mesh)
  return 1.0 - int(evaluate(state, images, labels)) / num_test


def fit_mixture(aul_N: jax.Array, gmm_config: ml_collections.ConfigDict):
  """Fits the 2-component mixture to the AUL on the device; returns it and p(mislabeled)."""
  mixture = gmm.fit(
    aul_N,
    n_components=2,
    max_iter=gmm_config.max_iter,
    tol=gmm_config.tol,
    n_init=gmm_config.n_init,
    key=jax.random.key(0),
  )
  mixture = gmm.sort_by_mean(mixture)
  return mixture, gmm.mislabel_probability(mixture, aul_N)


def package_versions() -> dict[str, str]:
  return {name: importlib.metadata.version(name) for name in _VERSIONED_PACKAGES}


def _scores_and_summary(config, dataset, noisy: NoisyLabels, run: AULRun, mixture, p_N):
  """The columns of scores.csv and the contents of summary.json."""
  aul_N, p_N = train.to_host((run.aul_N, p_N))
  flagged_N = p_N > 0.5
  scores = {
    'index': np.arange(len(aul_N)),
    'label': noisy.labels,
    'aul': aul_N.astype(np.float64),
    'p_mislabeled': p_N.astype(np.float64),
    'flagged': flagged_N,
  }
  mixture = train.to_host(mixture)
  summary = {
    'noise_estimate': float(gmm.noise_fraction(mixture)),
    'n_train': int(len(aul_N)),
    'n_flagged': int(flagged_N.sum()),
    'num_classes': dataset.num_classes,
    'gmm': {
      'weights': mixture.weights.tolist(),
      'means': mixture.means.tolist(),
      'variances': mixture.variances.tolist(),
      'log_likelihood': float(mixture.log_likelihood),
      'n_iter': int(mixture.n_iter),
      'converged': bool(mixture.converged),
    },
    'method': config.method,
    'aul_model_test_error': run.test_error,
  }
  if noisy.injected:
    scores['true_label'] = noisy.true_labels
    scores['is_mislabeled'] = noisy.is_mislabeled
    summary.update(metrics.detection_metrics(aul_N, flagged_N, noisy.is_mislabeled))
  return scores, summary


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = logging.info):
  """Runs the whole AUL pipeline and writes scores.csv and summary.json into `workdir`.

  Bad configs and data raise UserInputError before training starts, and nothing is written
  unless the run completes.
  """
  start = time.time()
  num_devices = config.num_devices or jax.local_device_count()
  config_lib.validate(config, num_devices)
  config_lib.check_workdir(workdir)
  dataset = data.load_dataset(config.data)
  noisy = inject_noise(dataset, config.noise)
  mesh = train.make_mesh(jax.local_devices()[:num_devices])
  log(
    f'{dataset.name}: {len(noisy.labels)} training examples, {dataset.num_classes} classes, '
    f'{num_devices} device(s); noise {config.noise.kind} at {config.noise.rate}'
  )
  aul_run = train_for_aul(config, dataset, noisy.labels, mesh, log)
  mixture, p_N = fit_mixture(aul_run.aul_N, config.gmm)
  scores, summary = _scores_and_summary(config, dataset, noisy, aul_run, mixture, p_N)
  summary.update(
    {
      'config': config.to_dict(),
      'versions': package_versions(),
      'devices': [str(d) for d in mesh.devices.flat],
      'wall_time_s': time.time() - start,
    }
  )
  history = None if aul_run.history_TxN is None else train.to_host(aul_run.history_TxN)
  outputs.write_run_outputs(workdir, scores, summary, history)
  log(
    f'noise estimate {summary["noise_estimate"]:.3f}, {summary["n_flagged"]} flagged; '
    f'outputs in {workdir}'
  )
  return summary
