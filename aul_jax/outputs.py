"""Run outputs (scores.csv, summary.json, aul_history.npy, ...), written all-or-nothing.

All files are staged in a folder of the workdir and renamed into place only once all of them
were written. summary.json, which marks a run complete and lists the other files, is removed
first and renamed last, so a run that failed half-way is never taken for a complete one.
CSVs are streamed to disk a block of rows at a time and arrays are saved straight into their
file, so writing the outputs of N examples holds no N-row text in memory.
"""

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

# What write_files takes for a file: text, bytes, an array (saved as .npy) or text chunks.
Content = str | bytes | np.ndarray | Iterable[str]

ROWS_PER_CHUNK = 1 << 13  # CSV rows formatted per write: about 2 MB of text at 12 columns.


def _format_value(value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return 'true' if value else 'false'
  if isinstance(value, (float, np.floating)):
    return repr(float(value)) if math.isfinite(value) else str(float(value))
  if isinstance(value, str) and any(c in value for c in ',"\n\r'):
    return '"' + value.replace('"', '""') + '"'  # RFC 4180 quoting, for the user's ids.
  return str(value)


def csv_chunks(
  columns: Mapping[str, np.ndarray], rows_per_chunk: int = ROWS_PER_CHUNK
) -> Iterator[str]:
  """A CSV of one row per example, as the header and then blocks of rows: floats printed
  with repr, so they round-trip exactly. Only one block's text exists at a time."""
  names = list(columns)
  arrays = [np.asarray(columns[name]) for name in names]
  lengths = {len(a) for a in arrays}
  if len(lengths) > 1:
    raise ValueError(
      f'columns of different lengths: {dict(zip(names, map(len, arrays), strict=True))}'
    )
  yield ','.join(names) + '\n'
  for start in range(0, lengths.pop() if lengths else 0, rows_per_chunk):
    rows = zip(*(a[start : start + rows_per_chunk].tolist() for a in arrays), strict=True)
    yield ''.join(','.join(_format_value(v) for v in row) + '\n' for row in rows)


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


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


STAGING_PREFIX = '.outputs-'  # WORKDIR/.outputs-XXXX: the files of a write in progress.


def _write_content(path: str, content: Content) -> None:
  """One staged file, fsynced: text, bytes, an array as .npy, or text chunks as they come."""
  with open(path, 'w' if isinstance(content, str) else 'wb') as f:
    if isinstance(content, str | bytes):
      f.write(content)
    elif isinstance(content, np.ndarray):
      np.save(f, content, allow_pickle=False)
    else:
      for chunk in content:
        f.write(chunk.encode())
    f.flush()
    os.fsync(f.fileno())


def write_files(workdir: str, contents: Mapping[str, Content], last: str | None = None) -> None:
  """Writes `{name: content}` into `workdir` as a set.

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
      _write_content(path, content)
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
  contents: dict[str, Content] = {
    'scores.csv': csv_chunks(scores),
    **(figures or {}),
    **{name: csv_chunks(columns) for name, columns in (tables or {}).items()},
    **{name: np.asarray(array) for name, array in (arrays or {}).items()},
  }
  if history_NxT is not None:
    contents['aul_history.npy'] = np.asarray(history_NxT, np.float32)
  summary = {**summary, 'outputs': sorted(contents)}
  contents['summary.json'] = summary_json(summary)
  write_files(workdir, contents, last='summary.json')
