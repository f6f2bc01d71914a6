"""Training dynamics beyond the AUL, accumulated per example on the device in the same pass.

- AUM (Pleiss et al., 2020): the assigned-label logit minus the largest other logit,
  averaged over epochs; mislabeled examples have low or negative margins.
- Forgetting events (Toneva et al., 2019): correct -> incorrect transitions between
  consecutive epochs, and examples that were never learned (never correct).
- Dataset cartography (Swayamdipta et al., 2020): the mean (confidence) and standard
  deviation (variability) over epochs of p(assigned label), and the fraction of epochs in
  which the prediction was correct (correctness).
- The loss at the last epoch, the statistic of DivideMix's loss mixture (Li et al., 2020).
- A suggested label: the class that was most often the largest other logit (the AUM's
  competitor), by a Boyer-Moore majority vote over epochs, O(N) state. Where one class wins
  most epochs it is that class; otherwise it leans to the later epochs.

Every accumulator is an (N,) array updated once per epoch from the epoch's per-example
vectors, which the train step scatters by example index exactly like the AUL's losses.
"""

import flax
import jax
import jax.numpy as jnp

# What a train step reports per example, in the order of the columns of an epoch's (N, Q)
# values (Q = 1 keeps only the loss, for the AUL alone).
PER_EXAMPLE = ('loss', 'correct', 'margin', 'confidence', 'other_class')


def per_example(logits_BxK: jax.Array, labels_B: jax.Array) -> dict[str, jax.Array]:
  """The margin, p(assigned label), correctness and largest other class (as float32, exact
  below 2**24 classes) of each example's logits."""
  logits_BxK = logits_BxK.astype(jnp.float32)
  is_label_BxK = jnp.arange(logits_BxK.shape[-1]) == labels_B[:, None]
  assigned_B = jnp.sum(jnp.where(is_label_BxK, logits_BxK, 0.0), axis=-1)
  largest_other_B = jnp.max(jnp.where(is_label_BxK, -jnp.inf, logits_BxK), axis=-1)
  log_p_BxK = jax.nn.log_softmax(logits_BxK)
  return {
    'margin': assigned_B - largest_other_B,
    'confidence': jnp.exp(jnp.sum(jnp.where(is_label_BxK, log_p_BxK, 0.0), axis=-1)),
    'correct': jnp.argmax(logits_BxK, axis=-1) == labels_B,
    'other_class': jnp.argmax(jnp.where(is_label_BxK, -jnp.inf, logits_BxK), axis=-1),
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
  vote_class_N: jax.Array  # The majority vote's candidate largest-other class, and its
  vote_count_N: jax.Array  # count (Boyer-Moore: +1 when it recurs, -1 when another does).
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
    vote_class_N=zeros(),
    vote_count_N=zeros(),
    num_epochs=jnp.zeros(lead, jnp.int32),
  )


def add_epoch(dynamics: Dynamics, epoch_N: dict[str, jax.Array]) -> Dynamics:
  """Folds one epoch's per-example vectors (keys PER_EXAMPLE, float32) into `dynamics`."""
  correct_N = epoch_N['correct']
  confidence_N = epoch_N['confidence']
  forgotten_N = dynamics.last_correct_N * (1.0 - correct_N)  # 0 at the first epoch.
  vote_class_N, vote_count_N = _vote(
    dynamics.vote_class_N, dynamics.vote_count_N, epoch_N['other_class']
  )
  return Dynamics(
    margin_sum_N=dynamics.margin_sum_N + epoch_N['margin'],
    confidence_sum_N=dynamics.confidence_sum_N + confidence_N,
    confidence_sq_sum_N=dynamics.confidence_sq_sum_N + confidence_N**2,
    correct_sum_N=dynamics.correct_sum_N + correct_N,
    forgetting_N=dynamics.forgetting_N + forgotten_N,
    last_correct_N=correct_N,
    last_loss_N=epoch_N['loss'],
    vote_class_N=vote_class_N,
    vote_count_N=vote_count_N,
    num_epochs=dynamics.num_epochs + 1,
  )


def _vote(class_N: jax.Array, count_N: jax.Array, new_N: jax.Array):
  """One step of the Boyer-Moore majority vote: a class seen in more than half of the
  epochs is the candidate at the end."""
  empty_N = count_N == 0
  same_N = new_N == class_N
  class_N = jnp.where(empty_N, new_N, class_N)
  count_N = jnp.where(empty_N | same_N, count_N + 1, count_N - 1)
  return class_N, count_N


def statistics(dynamics: Dynamics) -> dict[str, jax.Array]:
  """Per-example statistics over the epochs so far (float32 (N,) arrays).

  aum, confidence, variability (population std), correctness (fraction of epochs correct),
  forgetting_events (count) and never_learned (1.0 if never correct), last_loss, and
  suggested_label (a class index, stored as float32 like the others).
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
    'suggested_label': dynamics.vote_class_N,
  }


def combine_trials(statistics_R: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """One (N,) statistic per name from R trials' (R, N): the mean, and for the suggested
  label the class most trials suggest (the lowest trial's among equals)."""
  combined = {}
  for name, value_RxN in statistics_R.items():
    if name == 'suggested_label':
      agree_RxN = jnp.sum(value_RxN[:, None, :] == value_RxN[None, :, :], axis=1)
      best_N = jnp.argmax(agree_RxN, axis=0)
      combined[name] = jnp.take_along_axis(value_RxN, best_N[None], axis=0)[0]
    else:
      combined[name] = value_RxN.mean(axis=0)
  return combined
