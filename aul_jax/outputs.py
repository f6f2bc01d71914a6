"""Run outputs (scores.csv, summary.json, aul_history.npy, ...), written all-or-nothing.

All files are staged in a folder of the workdir and renamed into place only once all of them
were written. summary.json, which marks a run complete and lists the other files, is removed
first and renamed last, so a run that failed half-way is never taken for a complete one.
"""

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np


def _format_value(value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return 'true' if value else 'false'
  if isinstance(value, (float, np.floating)):
    return repr(float(value)) if math.isfinite(value) else str(float(value))
  if isinstance(value, str) and any(c in value for c in ',"\n\r'):
    return '"' + value.replace('"', '""') + '"'  # RFC 4180 quoting, for the user's ids.
  return str(value)


def scores_csv(columns: Mapping[str, np.ndarray]) -> str:
  """One row per example; floats printed with repr, so they round-trip exactly."""
  names = list(columns)
  rows = zip(*(np.asarray(columns[name]).tolist() for name in names), strict=True)
  lines = [','.join(names)]
  lines.extend(','.join(_format_value(v) for v in row) for row in rows)
  return '\n'.join(lines) + '\n'


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'cannot write {type(value).__name__} to JSON')


def summary_json(summary: Mapping) -> str:
  """Pretty JSON; NaN (e.g. AUROC without both classes) is written as null."""
  return json.dumps(_nan_to_none(summary), indent=2, sort_keys=True, default=_json_default) + '\n'


def _nan_to_none(value):
  if isinstance(value, Mapping):
    return {k: _nan_to_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_nan_to_none(v) for v in value]
  if isinstance(value, (float, np.floating)) and not math.isfinite(value):
    return None
  return value


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


STAGING_PREFIX = '.outputs-'  # WORKDIR/.outputs-XXXX: the files of a write in progress.


def write_files(workdir: str, contents: Mapping[str, str | bytes], last: str | None = None) -> None:
  """Writes `{name: text or bytes}` into `workdir` as a set.

  All files are first written (and fsynced) into a staging folder in the workdir. Then the
  old completion marker `last` is removed, the files are renamed into place, and `last` is
  renamed last. So the marker exists only while the whole set is in place, and a write that
  fails or is killed part-way leaves no marker: the run is not taken for complete and its
  rerun writes the set again. A staging folder left by a killed write is removed by the next
  write (the caller holds the workdir's lock, so no other writer can own it).
  """
  os.makedirs(workdir, exist_ok=True)
  _remove_stale_staging(workdir)
  staging = tempfile.mkdtemp(dir=workdir, prefix=STAGING_PREFIX)
  try:
    for name, content in contents.items():
      path = os.path.join(staging, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb' if isinstance(content, bytes) else 'w') as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
      os.chmod(path, 0o666 & ~_umask())
    if last is not None and os.path.exists(os.path.join(workdir, last)):
      os.remove(os.path.join(workdir, last))
    for name in sorted(contents, key=lambda name: name == last):
      target = os.path.join(workdir, name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(staging, name), target)
    _fsync_directory(workdir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(workdir: str) -> None:
  """Removes the staging folders of writes that were killed part-way."""
  for entry in os.listdir(workdir):
    if entry.startswith(STAGING_PREFIX):
      shutil.rmtree(os.path.join(workdir, entry), ignore_errors=True)


def _fsync_directory(path: str) -> None:
  """Makes the renames durable, so a power loss cannot undo the marker's."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_run_outputs(
  workdir: str,
  scores: Mapping[str, np.ndarray],
  summary: Mapping,
  history_NxT: np.ndarray | None = None,
  figures: Mapping[str, bytes] | None = None,
  tables: Mapping[str, Mapping[str, np.ndarray]] | None = None,
  arrays: Mapping[str, np.ndarray] | None = None,
) -> None:
  """One run's files: scores.csv, aul_history.npy (N, T), PNGs, other CSVs and .npy arrays
  (names may have a folder, as 'trials/...'), and last summary.json, which lists them under
  'outputs'."""
  contents: dict[str, str | bytes] = {
    'scores.csv': scores_csv(scores),
    **(figures or {}),
    **{name: scores_csv(columns) for name, columns in (tables or {}).items()},
    **{name: _npy_bytes(np.asarray(array)) for name, array in (arrays or {}).items()},
  }
  if history_NxT is not None:
    contents['aul_history.npy'] = _npy_bytes(np.asarray(history_NxT, np.float32))
  summary = {**summary, 'outputs': sorted(contents)}
  contents['summary.json'] = summary_json(summary)
  write_files(workdir, contents, last='summary.json')
