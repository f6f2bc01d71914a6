"""Step 3 and its baselines: what each retraining method weights, trains on and steps with.

All methods share the model zoo, the epoch loop and the weighted-mean loss; they differ
only in per-example weights, the objective, or (co-teaching) the step. See paper Section 5.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aul_jax import coteaching, losses, train
from aul_jax.errors import UserInputError

METHODS = ('aul', 'standard', 'oracle', 'random', 'reed_hard', 'coteaching')


def example_weights(
  method: str, p_mislabeled_N: np.ndarray | None, is_mislabeled_N: np.ndarray
) -> np.ndarray:
  """Fixed per-example loss weights of `method`; 1 for methods that weight nothing."""
  if method == 'aul':
    # Section 4.2's formula writes z_i = p(mislabeled), but the paper's text and intent are
    # to down-weight suspicious samples: the weight is the *clean* probability 1 - z_i.
    return (1.0 - np.asarray(p_mislabeled_N, np.float64)).astype(np.float32)
  if method == 'oracle':
    return (~np.asarray(is_mislabeled_N, bool)).astype(np.float32)
  return np.ones(len(is_mislabeled_N), np.float32)


def rectified_normal_weights(key: jax.Array, num_examples: int) -> jax.Array:
  """max(0, N(0, 1)) per example: Ren et al. (2018)'s Random baseline, redrawn every epoch."""
  return jnp.maximum(jax.random.normal(key, (num_examples,)), 0.0)


def lr_drop_epochs(num_epochs: int, fractions: Sequence[float]) -> tuple[int, ...]:
  """Epochs of the learning-rate drops: 150 and 225 of 300 scale to 0.5 and 0.75 of any run."""
  return tuple(int(round(f * num_epochs)) for f in fractions)


def check_method(method: str) -> None:
  """Raises UserInputError unless `method` is one of METHODS."""
  if method not in METHODS:
    raise UserInputError(f"unknown method '{method}'; known: {', '.join(METHODS)}")


def objective(method: str, reed_beta: float) -> train.Objective:
  if method == 'reed_hard':
    return losses.hard_bootstrap(reed_beta)
  return losses.cross_entropy


def draw_weights(method: str) -> Callable[[jax.Array, int], jax.Array] | None:
  return rectified_normal_weights if method == 'random' else None


def method_options(retrain_config: ml_collections.ConfigDict, noise_rate: float) -> dict:
  """`step_and_state`'s options from `config.retrain`: the forget rate of co-teaching is the
  noise rate, as Han et al. set it, unless the config gives one (>= 0)."""
  rate = retrain_config.coteaching_forget_rate
  return {
    'reed_beta': retrain_config.reed_beta,
    'coteaching_forget_rate': noise_rate if rate < 0 else rate,
    'coteaching_gradual_epochs': coteaching.gradual_epochs_for(
      retrain_config.epochs, retrain_config.coteaching_gradual_fraction
    ),
  }


def step_and_init(
  method: str,
  model,
  optimizer,
  init_state: Callable[[jax.Array], train.TrainState],
  *,
  reed_beta: float = 0.8,
  coteaching_forget_rate: float = 0.0,
  coteaching_gradual_epochs: int = 1,
):
  """The method's StepFn and `init(key) -> fresh state`: a pair of networks for co-teaching,
  else one. `init` is pure, so trials are `jax.vmap(init)(keys)`."""
  if method == 'coteaching':
    step = coteaching.make_coteaching_step(
      model,
      optimizer,
      max_forget_rate=coteaching_forget_rate,
      gradual_epochs=coteaching_gradual_epochs,
    )

    def init_pair(key):
      key_a, key_b = jax.random.split(key)
      return init_state(key_a), init_state(key_b)

    return step, init_pair
  return train.make_step(model, optimizer, objective(method, reed_beta)), init_state


def evaluated_state(state):
  """The network whose test error is reported (co-teaching: the first of the pair)."""
  return state[0] if isinstance(state, tuple) else state


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return math.ceil(num_examples / batch_size)
