"""The Area Under the Loss accumulator: AUL_i = sum over epochs of example i's training loss.

Everything here runs on the device: per-example losses are scattered by example index into
an (N,) array that is donated from epoch to epoch and never copied to the host in training.
"""

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class AULState:
  """Running AUL per example, and optionally each epoch's loss (the loss history)."""

  aul_N: jax.Array
  history_TxN: jax.Array | None = None


def init_aul_state(num_examples: int, num_epochs: int, history_dtype: str | None) -> AULState:
  """Zero accumulator; a (T, N) history of `history_dtype` when one is given, else none."""
  history = None
  if history_dtype is not None:
    history = jnp.zeros((num_epochs, num_examples), jnp.dtype(history_dtype))
  return AULState(aul_N=jnp.zeros((num_examples,), jnp.float32), history_TxN=history)


def scatter_losses(
  epoch_loss_N: jax.Array, index_B: jax.Array, loss_B: jax.Array, mask_B: jax.Array
) -> jax.Array:
  """Adds each real example's loss at its index; padded (mask 0) entries add nothing."""
  return epoch_loss_N.at[index_B].add(jnp.where(mask_B, loss_B, 0.0))


def add_epoch(state: AULState, epoch_loss_N: jax.Array, epoch: jax.Array) -> AULState:
  """Folds one epoch's per-example losses into the AUL (and the history row `epoch`)."""
  history = state.history_TxN
  if history is not None:
    # dynamic_update_slice updates in place; `.at[epoch].set` on a bfloat16 history makes
    # XLA:CPU upcast a copy of all of it every epoch (docs/benchmarks.md, section 3).
    row = epoch_loss_N.astype(history.dtype)[None]
    history = jax.lax.dynamic_update_slice(history, row, (epoch, jnp.zeros_like(epoch)))
  return AULState(aul_N=state.aul_N + epoch_loss_N, history_TxN=history)
