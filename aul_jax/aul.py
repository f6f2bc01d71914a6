"""The Area Under the Loss accumulator: AUL_i = sum over epochs of example i's training loss.

Everything here runs on the device: per-example losses are scattered by example index into
an (N,) array that is donated from epoch to epoch and never copied to the host in training.
The same state carries the other training dynamics (`aul_jax.dynamics`) of the same pass.

On several devices the state is split over the data axis (`aul_jax.train.init_aul_state`):
its example axis is padded to a whole number of rows per device, and the padding rows,
after the N examples, stay zero.
"""

import flax
import jax
import jax.numpy as jnp

from aul_jax import dynamics as dynamics_lib


@flax.struct.dataclass
class AULState:
  """Running AUL per example, optionally each epoch's loss (the loss history), and the
  other per-example training dynamics. Their example axis may be padded beyond
  `num_examples` (the real ones come first)."""

  aul_N: jax.Array
  history_NxT: jax.Array | None = None
  dynamics: dynamics_lib.Dynamics | None = None
  # With a history: the current epoch's losses, which `end_epoch` writes as its column.
  epoch_loss_N: jax.Array | None = None
  num_examples: int = flax.struct.field(pytree_node=False, default=0)


def init_aul_state(
  num_examples: int,
  num_epochs: int,
  history_dtype: str | None,
  *,
  dynamics: bool = True,
  trials: int = 0,
  rows: int | None = None,
) -> AULState:
  """Zero accumulator; an (N, T) history of `history_dtype` when one is given, else none;
  the other training dynamics unless `dynamics=False` (then only losses are scattered).
  With `trials` = R > 0 every array has a leading R axis. `rows` >= N pads the example
  axis (default: N rows)."""
  lead = (trials,) if trials else ()
  rows = num_examples if rows is None else rows
  if rows < num_examples:
    raise ValueError(f'rows={rows} is fewer than the {num_examples} examples')

  def zeros(shape, dtype=jnp.float32):  # Every field its own buffer, so it can be donated.
    return jnp.zeros(lead + shape, dtype)

  history = epoch_loss = None
  if history_dtype is not None:
    history = zeros((rows, num_epochs), jnp.dtype(history_dtype))
    epoch_loss = zeros((rows,))
  return AULState(
    aul_N=zeros((rows,)),
    history_NxT=history,
    dynamics=dynamics_lib.init_dynamics(rows, lead) if dynamics else None,
    epoch_loss_N=epoch_loss,
    num_examples=num_examples,
  )


def statistics(state: AULState) -> dict[str, jax.Array]:
  """Every per-example statistic of the run: the AUL and `dynamics.statistics`'s. Their
  first `state.num_examples` rows are the examples, any further rows padding
  (`aul_jax.train.host_statistics` cuts them off)."""
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


def add_rows(
  state: AULState, rows_B: jax.Array, values_BxQ: jax.Array, epoch: jax.Array
) -> AULState:
  """Folds a batch's per-example values (B, Q) into rows `rows_B` of the state, as
  `add_epoch` folds a whole epoch: each example once per epoch, so no (N, Q) epoch values
  are kept. Rows out of range (>= the state's rows) are dropped. `end_epoch` closes the
  epoch once all its batches are in."""
  take = lambda a: a.at[rows_B].get(mode='fill', fill_value=0)  # noqa: E731
  put = lambda a, new: a.at[rows_B].set(new, mode='drop')  # noqa: E731
  loss_B = values_BxQ[:, 0]
  dynamics = state.dynamics
  if dynamics is not None:
    values_B = dict(zip(dynamics_lib.PER_EXAMPLE, values_BxQ.T, strict=True))
    rows = jax.tree.map(lambda a: take(a) if a.ndim else a, dynamics)
    new = dynamics_lib.add_epoch(rows, values_B)
    dynamics = jax.tree.map(lambda a, b: put(a, b) if a.ndim else a, dynamics, new)
  epoch_loss = None if state.epoch_loss_N is None else put(state.epoch_loss_N, loss_B)
  aul_N = put(state.aul_N, take(state.aul_N) + loss_B)
  return state.replace(aul_N=aul_N, dynamics=dynamics, epoch_loss_N=epoch_loss)


def end_epoch(state: AULState, epoch: jax.Array) -> AULState:
  """Closes epoch `epoch` after `add_rows` has folded in all of its examples: counts it,
  and writes its losses as the history's column."""
  history, dynamics = state.history_NxT, state.dynamics
  if history is not None:
    history = _with_column(history, state.epoch_loss_N, epoch)
  if dynamics is not None:
    dynamics = dynamics.replace(num_epochs=dynamics.num_epochs + 1)
  return state.replace(history_NxT=history, dynamics=dynamics)


def _with_column(history_NxT: jax.Array, loss_N: jax.Array, epoch: jax.Array) -> jax.Array:
  """The history with column `epoch` set to `loss_N`, in place."""
  # dynamic_update_slice updates in place; `.at[epoch].set` on a bfloat16 history makes
  # XLA:CPU upcast a copy of all of it every epoch (docs/benchmarks.md, section 3).
  column = loss_N.astype(history_NxT.dtype)[:, None]
  return jax.lax.dynamic_update_slice(history_NxT, column, (jnp.zeros_like(epoch), epoch))


def add_epoch(state: AULState, epoch_NxQ: jax.Array, epoch: jax.Array) -> AULState:
  """Folds one epoch's (N, Q) per-example values (`init_epoch_values`) into the AUL, the
  history column `epoch` and, when tracked, the other dynamics."""
  epoch_loss_N = epoch_NxQ[:, 0]
  history = state.history_NxT
  if history is not None:
    history = _with_column(history, epoch_loss_N, epoch)
  dynamics = state.dynamics
  if dynamics is not None:
    values_N = dict(zip(dynamics_lib.PER_EXAMPLE, epoch_NxQ.T, strict=True))
    dynamics = dynamics_lib.add_epoch(dynamics, values_N)
  return state.replace(aul_N=state.aul_N + epoch_loss_N, history_NxT=history, dynamics=dynamics)
