"""Preemption-safe checkpoints of a run's training stages, in WORKDIR/checkpoints (orbax).

A checkpoint is taken at epoch boundaries: every `checkpoint.every_epochs` epochs, at the
end of each stage, and when SIGTERM or SIGINT arrives (the run then stops with Preempted).
Because every epoch's randomness is derived from (seed, stage, epoch), a resumed run
repeats exactly the computation of an uninterrupted one.
"""

import json
import os
import signal
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from aul_jax.errors import UserInputError

_IGNORED_SECTIONS = ('checkpoint',)  # How often to save does not change the results.


class Preempted(Exception):
  """The run was asked to stop; a checkpoint was saved and rerunning resumes it."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    items = {}
    for key, value in tree.items():
      items.update(_flatten(value, f'{prefix}{key}.'))
    return items
  return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict) -> list[str]:
  """'field: old -> new' for every config field that differs (the checkpoint section aside)."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  lines = []
  for name in sorted(set(old_flat) | set(new_flat)):
    if name.split('.')[0] in _IGNORED_SECTIONS:
      continue
    before, after = old_flat.get(name, '<absent>'), new_flat.get(name, '<absent>')
    if json.dumps(before, default=str) != json.dumps(after, default=str):
      lines.append(f'{name}: {before!r} -> {after!r}')
  return lines


def config_json(config: ml_collections.ConfigDict) -> dict:
  """The config as JSON-compatible data (tuples become lists), as stored with checkpoints."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def require_same_config(stored: dict, config: ml_collections.ConfigDict, what: str, force: bool):
  """Refuses to continue `what` under a different config unless `force`."""
  differences = config_differences(stored, config_json(config))
  if differences and not force:
    raise UserInputError(
      f'{what} was made with a different config; differing fields:\n  '
      + '\n  '.join(differences)
      + '\nuse a new --workdir, or pass --force to continue with the new config'
    )


class Checkpointer:
  """Saves and restores training stages; a context manager that catches SIGTERM and SIGINT."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, force: bool = False):
    self._directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._every = config.checkpoint.every_epochs
    self._config = config
    self._force = force
    self._manager = None
    self._stop_requested = False
    self._previous_handlers = {}

  def __enter__(self) -> 'Checkpointer':
    self._manager = ocp.CheckpointManager(
      self._directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=self._config.checkpoint.max_to_keep),
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._manager.wait_until_finished()
    self._manager.close()

  def _request_stop(self, signum, frame) -> None:
    if self._stop_requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once, without saving.
    self._stop_requested = True

  def latest(self) -> tuple[int, dict] | None:
    """(step, metadata) of the newest checkpoint, after checking it matches the config."""
    step = self._manager.latest_step()
    if step is None:
      return None
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = meta['meta']
    require_same_config(
      meta['config'], self._config, f'the checkpoint in {self._directory}', self._force
    )
    return step, meta

  def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
    """The named items of checkpoint `step`, placed like the arrays of `like`'s items."""
    args = {
      name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
      for name, tree in like.items()
    }
    return dict(self._manager.restore(step, args=ocp.args.Composite(**args)))

  def due(self, epochs_done: int, stage_epochs: int) -> bool:
    """Whether to save after `epochs_done` epochs of a stage of `stage_epochs`."""
    periodic = self._every > 0 and epochs_done % self._every == 0
    return periodic or epochs_done == stage_epochs or self._stop_requested

  def save(self, step: int, items: dict[str, Any], meta: dict) -> None:
    """Saves the named pytrees and `meta` as checkpoint `step`; raises Preempted if asked to."""
    meta = {**meta, 'config': config_json(self._config)}
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    self._manager.save(
      step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True
    )
    if self._stop_requested:
      self._manager.wait_until_finished()
      raise Preempted(
        f'stopped by a signal after checkpoint {step} ({meta["stage"]} epoch {meta["epoch"]}); '
        'rerun the same command to resume'
      )
