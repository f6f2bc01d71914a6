"""Run outputs (scores.csv, summary.json, aul_history.npy, ...), written all-or-nothing.

Every file is first written under a temporary name in the workdir and renamed into place only
once all of them were written. summary.json, which marks a run complete and lists the other
files, is renamed last, so a run that failed half-way is never taken for a complete one.
"""

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np


def _format_value(value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return 'true' if value else 'false'
  if isinstance(value, (float, np.floating)):
    return repr(float(value)) if math.isfinite(value) else str(float(value))
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


@contextlib.contextmanager
def _temporary_file(directory: str) -> Iterator[str]:
  fd, path = tempfile.mkstemp(dir=directory, prefix='.tmp-')
  os.close(fd)
  try:
    yield path
  finally:
    if os.path.exists(path):
      os.remove(path)


def write_files(workdir: str, contents: Mapping[str, str | bytes], last: str | None = None) -> None:
  """Writes `{name: text or bytes}` into `workdir` as a set: each file through a temporary
  one, all renamed into place once all are written, `last` (the completion marker) last."""
  os.makedirs(workdir, exist_ok=True)
  with contextlib.ExitStack() as stack:
    staged = {}
    for name, content in contents.items():
      os.makedirs(os.path.dirname(os.path.join(workdir, name)), exist_ok=True)
      path = stack.enter_context(_temporary_file(workdir))
      mode = 'wb' if isinstance(content, bytes) else 'w'
      with open(path, mode) as f:
        f.write(content)
      os.chmod(path, 0o666 & ~_umask())  # mkstemp creates 0600; outputs are ordinary files.
      staged[name] = path
    for name in sorted(staged, key=lambda name: name == last):
      os.replace(staged[name], os.path.join(workdir, name))


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
