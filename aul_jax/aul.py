"""The Area Under the Loss accumulator: AUL_i = sum over epochs of example i's training loss.

Everything here runs on the device: per-example losses are scattered by example index into
an (N,) array that is donated from epoch to epoch and never copied to the host in training.
The same state carries the other training dynamics (`aul_jax.dynamics`) of the same pass.
"""

import flax
import jax
import jax.numpy as jnp

from aul_jax import dynamics as dynamics_lib


@flax.struct.dataclass
class AULState:
  """Running AUL per example, optionally each epoch's loss (the loss history), and the
  other per-example training dynamics."""

  aul_N: jax.Array
  history_NxT: jax.Array | None = None
  dynamics: dynamics_lib.Dynamics | None = None


def init_aul_state(
  num_examples: int,
  num_epochs: int,
  history_dtype: str | None,
  *,
  dynamics: bool = True,
  trials: int = 0,
) -> AULState:
  """Zero accumulator; an (N, T) history of `history_dtype` when one is given, else none;
  the other training dynamics unless `dynamics=False` (then only losses are scattered).
  With `trials` = R > 0 every array has a leading R axis."""
  lead = (trials,) if trials else ()

  def zeros(shape, dtype=jnp.float32):  # Every field its own buffer, so it can be donated.
    return jnp.zeros(lead + shape, dtype)

  history = None
  if history_dtype is not None:
    history = zeros((num_examples, num_epochs), jnp.dtype(history_dtype))
  return AULState(
    aul_N=zeros((num_examples,)),
    history_NxT=history,
    dynamics=dynamics_lib.init_dynamics(num_examples, lead) if dynamics else None,
  )


def statistics(state: AULState) -> dict[str, jax.Array]:
  """Every per-example statistic of the run: the AUL and `dynamics.statistics`'s."""
  stats = {'aul': state.aul_N}
  if state.dynamics is not None:
    stats.update(dynamics_lib.statistics(state.dynamics))
  return stats


def tracked(state: AULState) -> int:
  """How many of dynamics.PER_EXAMPLE (a prefix: the loss first) an epoch must scatter."""
  return 1 if state.dynamics is None else len(dynamics_lib.PER_EXAMPLE)


def init_epoch_values(num_examples: int, num_tracked: int) -> jax.Array:
  """Zero (N, Q) float32 values of one epoch: column q is dynamics.PER_EXAMPLE[q]."""
  return jnp.zeros((num_examples, num_tracked), jnp.float32)


def scatter_losses(
  epoch_loss_N: jax.Array, index_B: jax.Array, loss_B: jax.Array, mask_B: jax.Array
) -> jax.Array:
  """Adds each real example's loss (or (B, Q) row of values) at its index; padded (mask 0)
  entries add nothing. One scatter for all Q values: rows, not Q separate scatters."""
  mask = mask_B.reshape(mask_B.shape + (1,) * (loss_B.ndim - 1))
  return epoch_loss_N.at[index_B].add(jnp.where(mask, loss_B, 0.0))


def add_epoch(state: AULState, epoch_NxQ: jax.Array, epoch: jax.Array) -> AULState:
  """Folds one epoch's (N, Q) per-example values (`init_epoch_values`) into the AUL, the
  history column `epoch` and, when tracked, the other dynamics."""
  epoch_loss_N = epoch_NxQ[:, 0]
  history = state.history_NxT
  if history is not None:
    # dynamic_update_slice updates in place; `.at[epoch].set` on a bfloat16 history makes
    # XLA:CPU upcast a copy of all of it every epoch (docs/benchmarks.md, section 3).
    column = epoch_loss_N.astype(history.dtype)[:, None]
    history = jax.lax.dynamic_update_slice(history, column, (jnp.zeros_like(epoch), epoch))
  dynamics = state.dynamics
  if dynamics is not None:
    values_N = dict(zip(dynamics_lib.PER_EXAMPLE, epoch_NxQ.T, strict=True))
    dynamics = dynamics_lib.add_epoch(dynamics, values_N)
  return AULState(aul_N=state.aul_N + epoch_loss_N, history_NxT=history, dynamics=dynamics)
