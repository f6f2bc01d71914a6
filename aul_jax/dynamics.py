"""Training dynamics beyond the AUL, accumulated per example on the device in the same pass.

- AUM (Pleiss et al., 2020): the assigned-label logit minus the largest other logit,
  averaged over epochs; mislabeled examples have low or negative margins.
- Forgetting events (Toneva et al., 2019): correct -> incorrect transitions between
  consecutive epochs, and examples that were never learned (never correct).
- Dataset cartography (Swayamdipta et al., 2020): the mean (confidence) and standard
  deviation (variability) over epochs of p(assigned label), and the fraction of epochs in
  which the prediction was correct (correctness).
- The loss at the last epoch, the statistic of DivideMix's loss mixture (Li et al., 2020).

Every accumulator is an (N,) array updated once per epoch from the epoch's per-example
vectors, which the train step scatters by example index exactly like the AUL's losses.
"""

import flax
import jax
import jax.numpy as jnp

# What a train step reports per example, in the order of the columns of an epoch's (N, Q)
# values (Q = 1 keeps only the loss, for the AUL alone).
PER_EXAMPLE = ('loss', 'correct', 'margin', 'confidence')


def per_example(logits_BxK: jax.Array, labels_B: jax.Array) -> dict[str, jax.Array]:
  """The margin, p(assigned label) and correctness of each example's logits (float32)."""
  logits_BxK = logits_BxK.astype(jnp.float32)
  is_label_BxK = jnp.arange(logits_BxK.shape[-1]) == labels_B[:, None]
  assigned_B = jnp.sum(jnp.where(is_label_BxK, logits_BxK, 0.0), axis=-1)
  largest_other_B = jnp.max(jnp.where(is_label_BxK, -jnp.inf, logits_BxK), axis=-1)
  log_p_BxK = jax.nn.log_softmax(logits_BxK)
  return {
    'margin': assigned_B - largest_other_B,
    'confidence': jnp.exp(jnp.sum(jnp.where(is_label_BxK, log_p_BxK, 0.0), axis=-1)),
    'correct': jnp.argmax(logits_BxK, axis=-1) == labels_B,
  }


@flax.struct.dataclass
class Dynamics:
  """Running sums over epochs (and the last epoch's values) of each example's dynamics."""

  margin_sum_N: jax.Array
  confidence_sum_N: jax.Array
  confidence_sq_sum_N: jax.Array
  correct_sum_N: jax.Array
  forgetting_N: jax.Array  # Learned -> forgotten transitions so far.
  last_correct_N: jax.Array
  last_loss_N: jax.Array
  num_epochs: jax.Array  # () int32: epochs folded in.


def init_dynamics(num_examples: int, lead: tuple[int, ...] = ()) -> Dynamics:
  """Zeros, with leading dimensions `lead` (the trials); every field its own buffer, so the
  state can be donated."""

  def zeros():
    return jnp.zeros(lead + (num_examples,), jnp.float32)

  return Dynamics(
    margin_sum_N=zeros(),
    confidence_sum_N=zeros(),
    confidence_sq_sum_N=zeros(),
    correct_sum_N=zeros(),
    forgetting_N=zeros(),
    last_correct_N=zeros(),
    last_loss_N=zeros(),
    num_epochs=jnp.zeros(lead, jnp.int32),
  )


def add_epoch(dynamics: Dynamics, epoch_N: dict[str, jax.Array]) -> Dynamics:
  """Folds one epoch's per-example vectors (keys PER_EXAMPLE, float32) into `dynamics`."""
  correct_N = epoch_N['correct']
  confidence_N = epoch_N['confidence']
  forgotten_N = dynamics.last_correct_N * (1.0 - correct_N)  # 0 at the first epoch.
  return Dynamics(
    margin_sum_N=dynamics.margin_sum_N + epoch_N['margin'],
    confidence_sum_N=dynamics.confidence_sum_N + confidence_N,
    confidence_sq_sum_N=dynamics.confidence_sq_sum_N + confidence_N**2,
    correct_sum_N=dynamics.correct_sum_N + correct_N,
    forgetting_N=dynamics.forgetting_N + forgotten_N,
    last_correct_N=correct_N,
    last_loss_N=epoch_N['loss'],
    num_epochs=dynamics.num_epochs + 1,
  )


def statistics(dynamics: Dynamics) -> dict[str, jax.Array]:
  """Per-example statistics over the epochs so far (float32 (N,) arrays).

  aum, confidence, variability (population std), correctness (fraction of epochs correct),
  forgetting_events (count) and never_learned (1.0 if never correct), and last_loss.
  """
  epochs = jnp.maximum(dynamics.num_epochs, 1).astype(jnp.float32)
  confidence_N = dynamics.confidence_sum_N / epochs
  variance_N = jnp.maximum(dynamics.confidence_sq_sum_N / epochs - confidence_N**2, 0.0)
  return {
    'aum': dynamics.margin_sum_N / epochs,
    'confidence': confidence_N,
    'variability': jnp.sqrt(variance_N),
    'correctness': dynamics.correct_sum_N / epochs,
    'forgetting_events': dynamics.forgetting_N,
    'never_learned': (dynamics.correct_sum_N == 0).astype(jnp.float32),
    'last_loss': dynamics.last_loss_N,
  }
