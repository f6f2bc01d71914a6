"""A workdir belongs to one run: an advisory lock held for the whole run, and which kind of
run (training or scoring) wrote its outputs.

The lock is `fcntl.flock` on WORKDIR/.lock, taken by process 0 (the one that writes) and
released by the kernel when the process ends, even by kill -9, so a crashed run never leaves
a stale lock. Advisory: it stops a second aul_jax run, not other programs.
"""

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator

from aul_jax.errors import UserInputError

LOCK_NAME = '.lock'


@contextlib.contextmanager
def held(workdir: str, command: str, primary: bool = True) -> Iterator[None]:
  """Holds WORKDIR's lock while the block runs; a second holder gets UserInputError naming
  the first (its pid, command and start time). Only `primary` processes take it."""
  if not primary:
    yield
    return
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise UserInputError(
        f'workdir {workdir} is in use by another run ({holder}); wait for it to finish, '
        'or use another --workdir'
      ) from None
    f.seek(0)
    f.truncate()
    started = time.strftime('%Y-%m-%d %H:%M:%S')
    f.write(f'pid {os.getpid()}, {command}, started {started}\n')
    f.flush()
    try:
      yield
    finally:
      if created and os.listdir(workdir) == [LOCK_NAME]:  # A run that wrote nothing.
        os.remove(path)
        os.rmdir(workdir)
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def outputs_kind(workdir: str) -> str | None:
  """'training' or 'scoring' for the run whose summary.json is in `workdir`; None if none
  (or unreadable: the run that reads it reports that)."""
  path = os.path.join(workdir, 'summary.json')
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return 'scoring' if 'inputs' in summary else 'training'


def refuse_other_kind(workdir: str, kind: str) -> None:
  """Refuses to write `kind` outputs over the other kind's, which would mix two runs."""
  found = outputs_kind(workdir)
  if found is not None and found != kind:
    raise UserInputError(
      f'workdir {workdir} holds the outputs of a {found} run; writing {kind} outputs there '
      f'would mix the two. Use another --workdir (e.g. {os.path.join(workdir, kind)})'
    )
