"""Preemption-safe runs: what a workdir was started with, each stage's checkpoints, and each
finished stage's results, all under WORKDIR/checkpoints.

  run.json         the config and a digest of the training labels, written at the start
  <stage>/         orbax checkpoints of the stage in progress: every `every_epochs` epochs,
                   at its end, and when SIGTERM or SIGINT arrives (the run then stops; a
                   signal to one process of several stops all after the same epoch)
  <stage>.npz      the finished stage's results: the artifact that later stages read

A stage is one training run ('aul', 'threshold', 'retrain'). Every epoch's randomness is
derived from (seed, stage, epoch), so a resumed run repeats exactly the computation of an
uninterrupted one. Damaged state is reported in one line and never crashes the run: a damaged
checkpoint falls back to an older one (or a fresh start), a damaged artifact reruns its stage.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from aul_jax.errors import Preempted, UserInputError
from aul_jax.progress import Log

# How often to save, and how the processes of a run find each other, do not change results.
_IGNORED_SECTIONS = ('checkpoint', 'distributed')


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    items = {}
    for key, value in tree.items():
      items.update(_flatten(value, f'{prefix}{key}.'))
    return items
  return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict) -> list[str]:
  """'field: old -> new' for every config field that differs (_IGNORED_SECTIONS aside)."""
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
  """The config as JSON-compatible data (tuples become lists), as stored in run.json."""
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


def digest(arrays: Mapping[str, np.ndarray]) -> str:
  """A SHA-256 of named arrays (their names, dtypes, shapes and bytes)."""
  sha = hashlib.sha256()
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    sha.update(f'{name}:{array.dtype.str}:{array.shape}'.encode())
    sha.update(array.tobytes())
  return sha.hexdigest()


def write_atomically(path: str, content: bytes) -> None:
  """Writes `content` to `path` through a temporary file and one rename."""
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'wb') as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


class Stage:
  """The checkpoints of one training stage in progress: `restore`, then `due` and `save`."""

  def __init__(self, run: 'Run', name: str, num_epochs: int, step_offset: int):
    self.name = name
    self.num_epochs = num_epochs
    self.step_offset = step_offset  # Epochs of the stages before it: TensorBoard's steps.
    self._run = run
    self._directory = os.path.join(run.directory, name)
    self._manager = None
    self._stopping = False  # All processes agreed to stop after this epoch (`due`).

  def __enter__(self) -> 'Stage':
    options = ocp.CheckpointManagerOptions(max_to_keep=self._run.max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    return self

  def __exit__(self, *exc_info) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def restore(self, state, aul_state) -> tuple[Any, Any, int]:
    """(state, aul_state, epochs done) from the newest intact checkpoint; the arguments,
    which say how to place the arrays, and 0 when there is none."""
    like = {'state': state, 'aul_state': aul_state}
    args = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
    restored, step = None, 0
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(train=args))['train']
        break
      except Exception as error:  # noqa: BLE001 - orbax raises many kinds for damaged files.
        self._run.log(
          f'checkpoint {step} of stage {self.name} in {self._directory} is damaged '
          f'({_first_line(error)}); trying an older one'
        )
        self._drop(step)  # Else saving that epoch again would find the step taken.
    if restored is not None:
      self._run.log(f'resuming the {self.name} stage after epoch {step}')
      return restored['state'], restored['aul_state'], step
    if step:
      self._run.log(f'no intact checkpoint of stage {self.name} is left; starting it over')
    return state, aul_state, 0

  def _drop(self, step: int) -> None:
    """Deletes a damaged checkpoint (process 0; the others wait at the next save)."""
    if _is_primary():
      shutil.rmtree(os.path.join(self._directory, str(step)), ignore_errors=True)
    self._manager.reload()

  def due(self, epochs_done: int) -> bool:
    """Whether to save after `epochs_done` epochs: periodically, at the end, or when asked.
    Called after every epoch by every process, which is where they agree on stopping."""
    every = self._run.every_epochs
    periodic = every > 0 and epochs_done % every == 0
    self._stopping = self._run.stop_agreed()
    return periodic or epochs_done == self.num_epochs or self._stopping

  def save(self, epochs_done: int, state, aul_state) -> None:
    """Saves the stage after `epochs_done` epochs; raises Preempted if a signal asked to stop."""
    items = {'train': ocp.args.StandardSave({'state': state, 'aul_state': aul_state})}
    self._manager.save(epochs_done, args=ocp.args.Composite(**items), force=True)
    # Asked again: a signal may come while the epoch is reported, after `due` (every process
    # saves this epoch, so all take part in the exchange).
    if self._stopping or self._run.stop_agreed():
      self._manager.wait_until_finished()
      raise Preempted(
        f'stopped by a signal after {self.name} epoch {epochs_done}; '
        'rerun the same command to resume'
      )


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:200]


class Run:
  """A run's saved state in WORKDIR/checkpoints; a context manager that catches SIGTERM and
  SIGINT (the current stage then saves at its next epoch boundary and the run stops)."""

  def __init__(
    self,
    workdir: str,
    config: ml_collections.ConfigDict,
    stages: Sequence[tuple[str, int]],
    *,
    log: Log = logging.info,
    force: bool = False,
  ):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.every_epochs = config.checkpoint.every_epochs
    self.max_to_keep = config.checkpoint.max_to_keep
    self.log = log
    self.stop_requested = False
    self._config = config
    self._force = force
    self._offsets = {}
    offset = 0
    for name, epochs in stages:
      self._offsets[name] = (epochs, offset)
      offset += epochs
    self._previous_handlers = {}

  def __enter__(self) -> 'Run':
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)

  def _request_stop(self, signum, frame) -> None:
    if self.stop_requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once, without saving.
    self.stop_requested = True

  def stop_agreed(self) -> bool:
    """Whether a signal reached any process of the run. Each checks its own flag, so with
    several processes they exchange them (one tiny all-gather): a signal to one makes all
    save the same epoch, where a save of one alone would wait forever for the others."""
    if jax.process_count() == 1:
      return self.stop_requested
    flags = multihost_utils.process_allgather(np.int32(self.stop_requested))
    return bool(np.any(flags))

  def start(self, labels: Mapping[str, np.ndarray]) -> None:
    """Records the config and the labels, or checks them against those recorded."""
    path = os.path.join(self.directory, 'run.json')
    labels_digest = digest(labels)
    stored = _read_json(path, required=('config', 'labels'))
    if stored is not None:
      require_same_config(
        stored['config'], self._config, f'the checkpoints in {self.directory}', self._force
      )
      if stored['labels'] != labels_digest:
        raise UserInputError(
          'the training labels differ from those in the checkpoints (did the data or the '
          f'noise change?); use a new --workdir, or delete {self.directory}'
        )
      if not self._force:
        return
    if _is_primary():
      os.makedirs(self.directory, exist_ok=True)
      content = {'config': config_json(self._config), 'labels': labels_digest}
      write_atomically(path, json.dumps(content, indent=2, sort_keys=True).encode())

  def stage(self, name: str) -> Stage:
    """The checkpoints of stage `name`, one of those the run was planned with."""
    epochs, offset = self._offsets[name]
    return Stage(self, name, epochs, offset)

  def finished(self, name: str) -> dict[str, np.ndarray] | None:
    """The results of stage `name` if it finished before (None if not, or if damaged)."""
    path = os.path.join(self.directory, f'{name}.npz')
    if not os.path.exists(path):
      return None
    try:
      with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
      self.log(f'the results of stage {name} in {path} are damaged ({error}); rerunning it')
      return None

  def finish(self, name: str, results: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Saves a finished stage's results and drops its checkpoints; returns the results as
    later stages and reruns read them."""
    results = {key: np.asarray(value) for key, value in results.items()}
    if _is_primary():  # The other processes hold the same results (replicated state).
      buffer = io.BytesIO()
      np.savez(buffer, **results)
      os.makedirs(self.directory, exist_ok=True)
      write_atomically(os.path.join(self.directory, f'{name}.npz'), buffer.getvalue())
      shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    return results


def _is_primary() -> bool:
  """Process 0 writes the run's files; the workdir is on a file system all processes share."""
  return jax.process_index() == 0


def _read_json(path: str, required: Sequence[str] = ()) -> dict | None:
  """A JSON object with the `required` keys; None if there is no file; UserInputError if it
  is damaged (not JSON, or not such an object)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      content = json.load(f)
    if not isinstance(content, dict) or any(key not in content for key in required):
      raise ValueError(f'expected a JSON object with {", ".join(required)}')
  except (OSError, ValueError) as error:
    raise UserInputError(
      f'{path} is damaged ({_first_line(error)}); delete it to start the run over, or use a '
      'new --workdir'
    ) from None
  return content
