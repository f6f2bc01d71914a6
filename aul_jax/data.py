"""Image classification data sets as in-memory numpy arrays: digits, a user's .npz, or TFDS.

Example i of the training split has index i; per-example statistics (AUL, noise masks)
are keyed by that index, so every loader keeps a stable order.
"""

import dataclasses
import difflib
import zipfile

import numpy as np

from aul_jax import checks
from aul_jax.errors import UserInputError

BUILTIN_NAMES = ('digits', 'npz')

# TFDS name -> (train split, test split). CIFAR uses the paper's 45k/5k split of the
# official training set; 'train[45000:]' is its held-out validation set and is never loaded.
TFDS_SPLITS = {
  'cifar10': ('train[:45000]', 'test'),
  'cifar100': ('train[:45000]', 'test'),
}
DEFAULT_TFDS_SPLITS = ('train', 'test')

_NPZ_REQUIRED = ('x_train', 'y_train')

_STD_FLOOR = 1e-6  # Raw pixel units; keeps constant channels from dividing by zero.
_STATS_CHUNK = 1 << 20  # Pixels per chunk when computing float64 statistics.


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Normalised train/test images and integer labels, plus what is needed to undo it."""

  name: str
  x_train: np.ndarray  # (N, H, W, C) float32, normalised with the training mean/std.
  y_train: np.ndarray  # (N,) int32 labels as given by the source, before injected noise.
  x_test: np.ndarray  # (M, H, W, C) float32; M is 0 when the source has no test split.
  y_test: np.ndarray  # (M,) int32
  num_classes: int
  augment: bool  # True for 32x32 colour images: random crop and flip happen on device.
  mean: np.ndarray  # (C,) float32 per-channel mean in raw pixel units.
  std: np.ndarray  # (C,) float32 per-channel std in raw pixel units.
  # (N,) int32 true labels when the source has them beside the given ones (CIFAR-10N's human
  # labels against CIFAR-10's): the noise is then real and its truth known. Else None.
  y_train_clean: np.ndarray | None = None


def load_dataset(
  name: str = 'digits',
  *,
  path: str = '',
  data_dir: str = '',
  test_fraction: float = 0.2,
  split_seed: int = 0,
  label_key: str = 'label',
  clean_label_key: str = '',
) -> Dataset:
  """Loads 'digits' (split by test_fraction and split_seed), 'npz' (the file at `path`) or a
  TFDS data set prepared in `data_dir`; the fields of `config.data`.

  For TFDS, training labels come from the feature `label_key`. `clean_label_key`, if given,
  names a feature of true labels (CIFAR-10N: 'worse_label' given, 'label' true); the test
  split is then labelled by it, else by `label_key`.
  """
  if not isinstance(name, str) or not name:
    raise UserInputError(f'data.name {name!r} is invalid; expected a non-empty string')
  _check_label_keys(name, label_key, clean_label_key)
  clean = None
  if name == 'digits':
    arrays = _load_digits(test_fraction, split_seed)
  elif name == 'npz':
    arrays = _load_npz(path)
  else:
    arrays, clean = _load_tfds(name, data_dir, label_key, clean_label_key)
  return _make_dataset(name, *arrays, y_train_clean=clean)


def _check_label_keys(name: str, label_key: str, clean_label_key: str) -> None:
  """The label features are strings, distinct, and only for TFDS (digits and npz have one)."""
  for field, value in (('label_key', label_key), ('clean_label_key', clean_label_key)):
    if not isinstance(value, str):
      raise UserInputError(f'data.{field} {value!r} is invalid; expected a feature name')
  if not label_key:
    raise UserInputError("data.label_key is empty; expected a feature name such as 'label'")
  if name in BUILTIN_NAMES and (label_key != 'label' or clean_label_key):
    raise UserInputError(
      f'data.label_key and data.clean_label_key choose TFDS features; data.name {name!r} has '
      "one label per image: leave them at 'label' and ''"
    )
  if clean_label_key == label_key:
    raise UserInputError(
      f'data.clean_label_key {clean_label_key!r} is data.label_key too; name the feature of '
      "true labels (e.g. 'label'), or leave it '' when the truth is unknown"
    )


# Each loader returns raw (x_train, y_train, x_test, y_test, num_classes) with images
# shaped (N, H, W, C), any real dtype, and labels int32.
_RawArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def _load_digits(test_fraction: float, split_seed: int) -> _RawArrays:
  """Loads scikit-learn's 8x8 digits with a seeded, stratified train/test split."""
  if not checks.is_number(test_fraction):
    raise UserInputError(f'data.test_fraction {test_fraction!r} is invalid; expected a float')
  if not 0 < test_fraction < 1:
    raise UserInputError(f'data.test_fraction {test_fraction} is invalid; expected 0 < f < 1')
  if not checks.is_int(split_seed) or split_seed < 0:
    raise UserInputError(f'data.split_seed {split_seed!r} is invalid; expected an integer >= 0')
  # Imported here: scikit-learn takes 1.4 s to import, which every other data set, every
  # config error and every command's start-up would pay.
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection

  digits = sk_datasets.load_digits()
  x_NHWC = digits.images[..., None]
  y_N = digits.target.astype(np.int32)
  try:
    train_idx, test_idx = model_selection.train_test_split(
      np.arange(y_N.size), test_size=test_fraction, random_state=split_seed, stratify=y_N
    )
  except ValueError as e:  # e.g. a test split smaller than the number of classes.
    raise UserInputError(f'data.test_fraction {test_fraction} is unusable for digits: {e}') from e
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  num_classes = int(y_N.max()) + 1
  return x_NHWC[train_idx], y_N[train_idx], x_NHWC[test_idx], y_N[test_idx], num_classes


def _load_npz(path: str) -> _RawArrays:
  """Loads and validates a Keras-layout .npz: x_train, y_train and optional x_test, y_test."""
  if not path:
    raise UserInputError("data.path is required for data.name='npz'")
  arrays = _read_npz(path)
  x_train, y_train = _checked_split(path, arrays, 'train')
  if 'x_test' in arrays:
    x_test, y_test = _checked_split(path, arrays, 'test')
    if x_test.shape[1:] != x_train.shape[1:]:
      raise UserInputError(
        f"data file {path}: key 'x_test' has images of shape {x_test.shape[1:]} but 'x_train' "
        f'has {x_train.shape[1:]}; expected the same (H, W, C)'
      )
  else:
    x_test = np.zeros((0, *x_train.shape[1:]), x_train.dtype)
    y_test = np.zeros((0,), np.int32)
  num_classes = int(y_train.max()) + 1
  outside = np.flatnonzero(y_test >= num_classes)
  if outside.size:  # It would add a class that nothing is trained on: test error 1 on it.
    i = outside[0]
    raise UserInputError(
      f"data file {path}: key 'y_test' has label {y_test[i]} at index {i}, but 'y_train' has "
      f'labels 0..{num_classes - 1} only; every test label must be a training class'
    )
  if num_classes < 2:
    keys = "keys 'y_train' and 'y_test' hold" if len(y_test) else "key 'y_train' holds"
    raise UserInputError(f'data file {path}: {keys} only class 0; expected at least 2 classes')
  return x_train, y_train, x_test, y_test, num_classes


def _checked_split(path: str, arrays: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split's images as (N, H, W, C) and labels as int32, checked."""
  x_key, y_key = f'x_{split}', f'y_{split}'
  x = checks.images(arrays[x_key], f'data file {path}: key {x_key!r}')
  y = checks.class_labels(
    arrays[y_key],
    f'data file {path}: key {y_key!r}',
    count=len(x),
    count_of=f'{x_key!r} has {len(x)} images',
  )
  return x, y


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Reads the x_/y_ train/test arrays of an .npz, checking keys come in pairs."""
  try:
    npz = np.load(path, allow_pickle=False)
  except FileNotFoundError as e:
    raise UserInputError(f'data file {path}: no such file (set data.path)') from e
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    why = checks.unreadable(path, 'an .npz archive (write one with np.savez)')
    raise UserInputError(f'data file {path} {why}') from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise UserInputError(
      f'data file {path}: holds a single array, not an .npz archive; expected keys '
      "'x_train', 'y_train' and optionally 'x_test', 'y_test' (write it with np.savez)"
    )
  with npz:
    present = sorted(npz.files)
    for key in _NPZ_REQUIRED:
      if key not in present:
        raise UserInputError(f'data file {path}: key {key!r} is missing; keys present: {present}')
    if ('x_test' in present) != ('y_test' in present):
      given, missing = ('x_test', 'y_test') if 'x_test' in present else ('y_test', 'x_test')
      raise UserInputError(
        f'data file {path}: key {given!r} is present but {missing!r} is missing; '
        'expected both or neither'
      )
    keys = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k in present]
    return {key: _read_npz_key(npz, path, key) for key in keys}


def _read_npz_key(npz: np.lib.npyio.NpzFile, path: str, key: str) -> np.ndarray:
  """Reads one array, turning numpy's pickle and zip errors into a UserInputError."""
  try:
    return npz[key]
  except ValueError as e:  # Object arrays need pickle, which we never allow.
    raise UserInputError(
      f'data file {path}: key {key!r} holds an object (pickled) array; expected a numeric array'
    ) from e
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise UserInputError(f'data file {path}: key {key!r} could not be read ({e})') from e


def _load_tfds(
  name: str, data_dir: str, label_key: str, clean_label_key: str
) -> tuple[_RawArrays, np.ndarray | None]:
  """Loads a prepared TFDS data set (never downloads); CIFAR keeps the paper's 45k split.
  Returns the raw arrays and the true training labels (None without `clean_label_key`)."""
  import tensorflow_datasets as tfds  # Deferred: digits and npz users skip its import.

  train_split, test_split = TFDS_SPLITS.get(_tfds_base_name(name), DEFAULT_TFDS_SPLITS)
  train = _tfds_source(tfds, name, train_split, data_dir)
  test = _tfds_source(tfds, name, test_split, data_dir)
  train_keys = (label_key, clean_label_key) if clean_label_key else (label_key,)
  x_train, (y_train, *clean) = _read_source(name, train_split, train, train_keys)
  x_test, (y_test,) = _read_source(name, test_split, test, (clean_label_key or label_key,))
  if x_test.shape[1:] != x_train.shape[1:]:
    raise UserInputError(
      f'TFDS data set {name!r}: test images have shape {x_test.shape[1:]} but training images '
      f'have {x_train.shape[1:]}; expected the same'
    )
  labels_max = max(y_train.max(), y_test.max(initial=0), *(c.max() for c in clean))
  num_classes = _tfds_num_classes(train, label_key, labels_max + 1)
  return (x_train, y_train, x_test, y_test, num_classes), (clean[0] if clean else None)


def _tfds_base_name(name: str) -> str:
  """Strips a TFDS config and version: 'cifar10/foo:3.0.2' -> 'cifar10'."""
  return name.split(':')[0].split('/')[0]


def _tfds_source(tfds, name: str, split: str, data_dir: str):
  """Opens one split as a random-access source, explaining how to fix each failure."""
  where = data_dir or 'the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)'
  build = f'tfds build {_tfds_base_name(name)} --file_format=array_record --data_dir DIR'
  try:
    return tfds.data_source(
      name,
      split=split,
      data_dir=data_dir or None,
      download=False,  # Never reach the network from here; preparing is a separate step.
      builder_kwargs={'file_format': 'array_record'},
    )
  except tfds.core.DatasetNotFoundError as e:
    close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False))
    hint = f'; did you mean {", ".join(map(repr, close))}?' if close else ''
    raise UserInputError(
      f'data.name {name!r} is neither a built-in data set ({", ".join(map(repr, BUILTIN_NAMES))})'
      f' nor a TFDS data set (https://www.tensorflow.org/datasets/catalog){hint}'
    ) from e
  except KeyError as e:  # tfds: "`splits` is empty ... has not been generated yet".
    raise UserInputError(
      f'TFDS data set {name!r} is not prepared in {where}; on a machine with internet run '
      f'`{build}`, copy DIR here and set data.data_dir=DIR (tfds said: {e})'
    ) from e
  except NotImplementedError as e:  # Prepared as TFRecord, which has no random access.
    raise UserInputError(
      f'TFDS data set {name!r} in {where} is not in array_record format; rebuild it with '
      f'`{build}` ({e})'
    ) from e
  except ValueError as e:  # e.g. an unknown split such as 'test'.
    raise UserInputError(f'TFDS data set {name!r}: cannot open split {split!r}: {e}') from e


def _read_source(
  name: str, split: str, source, label_keys: tuple[str, ...]
) -> tuple[np.ndarray, list[np.ndarray]]:
  """Reads every example of a TFDS source: (N, H, W, C) images and, per feature of
  `label_keys`, (N,) int32 labels."""
  if len(source) == 0:
    raise UserInputError(f'TFDS data set {name!r}: split {split!r} has 0 examples')
  # Item by item: tfds' mocked sources (tests) do not support batched __getitems__.
  examples = [source[i] for i in range(len(source))]
  missing = [key for key in ('image', *label_keys) if key not in examples[0]]
  if missing:
    raise UserInputError(
      f'TFDS data set {name!r}: split {split!r} lacks the features {missing}; features '
      f'present: {sorted(examples[0])}; set data.label_key (and data.clean_label_key) to '
      'label features of image classification'
    )
  try:
    x_NHWC = np.stack([ex['image'] for ex in examples])
  except ValueError as e:
    raise UserInputError(
      f'TFDS data set {name!r}: split {split!r} has images of different shapes; expected one'
    ) from e
  if x_NHWC.ndim == 3:
    x_NHWC = x_NHWC[..., None]
  labels = []
  for key in label_keys:
    where = f'TFDS data set {name!r}: split {split!r}, feature {key!r}'
    labels.append(checks.class_labels(np.asarray([ex[key] for ex in examples]), where))
  return x_NHWC, labels


def _tfds_num_classes(source, label_key: str, labels_max_plus_one: int) -> int:
  """Returns the label feature's class count, or max label + 1 when tfds does not know it."""
  try:
    num_classes = source.dataset_info.features[label_key].num_classes
  except (AttributeError, KeyError, TypeError):
    num_classes = None
  return int(num_classes) if num_classes else int(labels_max_plus_one)


def _make_dataset(
  name: str,
  x_train: np.ndarray,
  y_train: np.ndarray,
  x_test: np.ndarray,
  y_test: np.ndarray,
  num_classes: int,
  y_train_clean: np.ndarray | None = None,
) -> Dataset:
  """Normalises images per channel with training statistics and packs a Dataset."""
  mean_C, std_C = _channel_stats(x_train)
  return Dataset(
    name=name,
    x_train=_normalise(x_train, mean_C, std_C),
    y_train=y_train.astype(np.int32),
    x_test=_normalise(x_test, mean_C, std_C),
    y_test=y_test.astype(np.int32),
    num_classes=int(num_classes),
    augment=x_train.shape[1:] == (32, 32, 3),
    mean=mean_C.astype(np.float32),
    std=std_C.astype(np.float32),
    y_train_clean=y_train_clean,
  )


def _channel_stats(x_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns float64 per-channel mean and floored std in one chunked pass over the pixels."""
  pixels_PxC = x_NHWC.reshape(-1, x_NHWC.shape[-1])
  # Sums are taken around a first-chunk estimate of the mean, so var = E[d^2] - E[d]^2
  # does not cancel catastrophically; chunks bound the float64 copy.
  shift_C = pixels_PxC[:_STATS_CHUNK].mean(axis=0, dtype=np.float64)
  sum_C, sq_sum_C = np.zeros_like(shift_C), np.zeros_like(shift_C)
  for start in range(0, len(pixels_PxC), _STATS_CHUNK):
    dev_PxC = pixels_PxC[start : start + _STATS_CHUNK].astype(np.float64) - shift_C
    sum_C += np.einsum('pc->c', dev_PxC)
    sq_sum_C += np.einsum('pc,pc->c', dev_PxC, dev_PxC)
  mean_dev_C = sum_C / len(pixels_PxC)
  var_C = np.maximum(sq_sum_C / len(pixels_PxC) - mean_dev_C**2, 0.0)
  return shift_C + mean_dev_C, np.maximum(np.sqrt(var_C), _STD_FLOOR)


def _normalise(x_NHWC: np.ndarray, mean_C: np.ndarray, std_C: np.ndarray) -> np.ndarray:
  """Returns (x - mean) / std as float32."""
  return (x_NHWC.astype(np.float32) - mean_C.astype(np.float32)) / std_C.astype(np.float32)
