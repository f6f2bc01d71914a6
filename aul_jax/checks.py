"""The checks of user values that several modules share: integers, class labels, images.

Each raises UserInputError with a message that starts with `where` (the file, key or field),
so every caller reports a bad value the same way.
"""

import numbers
import os

import numpy as np

from aul_jax.errors import UserInputError

MAX_LABEL = np.iinfo(np.int32).max  # Labels are stored as int32.


def is_int(value) -> bool:
  """A Python or numpy integer, not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  """A Python or numpy real number, not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def class_labels(
  y,
  where: str,
  *,
  count: int | None = None,
  count_of: str | None = None,
  num_classes: int | None = None,
  integral_floats: bool = False,
) -> np.ndarray:
  """(N,) int32 class labels 0..K-1 from `y`; Keras's (N, 1) layout is flattened.

  `count` is the number of labels expected (`count_of` says whose, e.g. "'x_train' has 6
  images"); `num_classes` bounds them; `integral_floats` accepts 3.0 for 3 (CSV files).
  """
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  whole = y.dtype.kind == 'f' and np.all(np.isfinite(y)) and np.all(y == np.round(y))
  if integral_floats and whole:
    y = y.astype(np.int64)
  if y.dtype.kind not in 'iu':
    raise UserInputError(f'{where} has dtype {y.dtype}; expected integer class labels 0..K-1')
  if y.ndim != 1:
    raise UserInputError(f'{where} has shape {y.shape}; expected 1-D labels (N,) or (N, 1)')
  if count is not None and len(y) != count:
    raise UserInputError(f'{where} has {len(y)} entries but {count_of or f"{count} were expected"}')
  top = MAX_LABEL if num_classes is None else num_classes - 1
  expected = '0..K-1' if num_classes is None else f'0..{top}'
  negative = np.flatnonzero(y < 0)
  if negative.size:
    i = negative[0]
    raise UserInputError(f'{where} has negative label {y[i]} at index {i}; expected {expected}')
  too_big = np.flatnonzero(y > top)
  if too_big.size:
    i = too_big[0]
    raise UserInputError(
      f'{where} has label {y[i]} at index {i}, out of range; expected {expected}'
      + (f' with K <= {MAX_LABEL}' if num_classes is None else '')
    )
  return y.astype(np.int32)


def images(x, where: str) -> np.ndarray:
  """Finite, non-empty images as (N, H, W, C); (N, H, W) gets one channel."""
  x = np.asarray(x)
  if x.dtype.kind not in 'uif':
    raise UserInputError(f'{where} has dtype {x.dtype}; expected uint8, integer or float images')
  if x.ndim not in (3, 4):
    raise UserInputError(f'{where} has shape {x.shape}; expected (N, H, W) or (N, H, W, C)')
  if x.shape[0] == 0:
    raise UserInputError(f'{where} has 0 images; expected at least one')
  if x.size == 0:
    raise UserInputError(f'{where} has empty images of shape {x.shape[1:]}; expected H, W, C > 0')
  if x.dtype.kind == 'f':
    bad = np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))
    if bad.size:
      raise UserInputError(f'{where} has NaN or inf pixels in image {bad[0]}; expected finite')
  return x if x.ndim == 4 else x[..., None]


def unreadable(path: str, expected: str) -> str:
  """Why `path` is not a readable `expected` ('an .npz archive'), for a one-line error:
  missing, a directory, empty, text, a truncated .npy or zip archive, or another format."""
  if os.path.isdir(path):
    return f'is a directory, not {expected}'
  if not os.path.exists(path):
    return 'does not exist'
  with open(path, 'rb') as f:
    head = f.read(4096)
  if not head:
    return f'is empty, not {expected}'
  if head.startswith(b'PK'):
    return f'is a zip (.npz) archive that is truncated or damaged; expected {expected}'
  if head.startswith(b'\x93NUMPY'):
    return f'is an .npy array that is truncated or damaged; expected {expected}'
  if head.startswith(b'\x80') and b'numpy' in head:
    return f'holds pickled Python objects, which are never loaded; expected {expected}'
  try:
    head.decode('utf-8')
  except UnicodeDecodeError:
    return f'is not {expected} (an unknown binary format)'
  return f'is a text file, not {expected}'
