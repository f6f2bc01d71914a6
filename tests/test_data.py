"""Tests for data loading: digits, user .npz files and TFDS (mocked, never downloaded)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from aul_jax import config as config_lib
from aul_jax import data
from aul_jax.errors import UserInputError


def _config(**overrides):
  """The fields of `config.data` that `data.load_dataset` takes, with overrides."""
  return {'name': 'digits', **overrides}


def _assert_normalised(ds: data.Dataset) -> None:
  """Training images have ~0 mean and ~1 std per channel."""
  axes = (0, 1, 2)
  np.testing.assert_allclose(ds.x_train.mean(axis=axes, dtype=np.float64), 0.0, atol=1e-4)
  np.testing.assert_allclose(ds.x_train.std(axis=axes, dtype=np.float64), 1.0, atol=1e-4)


# Digits.


def test_the_data_config_fields_are_load_datasets_arguments():
  fields = dict(config_lib.base_config().data)
  assert fields.pop('input') == 'device'
  assert data.load_dataset(**fields).name == 'digits'


def test_digits_shapes_dtypes_and_counts():
  ds = data.load_dataset(**_config())
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_test.shape[1:] == (8, 8, 1)
  assert len(ds.x_train) + len(ds.x_test) == 1797
  assert len(ds.x_test) == 360  # ceil(0.2 * 1797), sklearn's rounding.
  assert len(ds.y_train) == len(ds.x_train) and len(ds.y_test) == len(ds.x_test)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.num_classes == 10 and not ds.augment
  assert ds.mean.shape == (1,) and ds.std.shape == (1,) and ds.mean.dtype == np.float32
  _assert_normalised(ds)


def test_digits_split_is_stratified():
  ds = data.load_dataset(**_config())
  all_counts = np.bincount(sk_datasets.load_digits().target)
  expected_test = all_counts * len(ds.y_test) / all_counts.sum()
  assert np.all(np.abs(np.bincount(ds.y_test, minlength=10) - expected_test) <= 1)


def test_digits_order_follows_sorted_source_indices():
  digits = sk_datasets.load_digits()
  ds = data.load_dataset(**_config(split_seed=3))
  train_idx, _ = model_selection.train_test_split(
    np.arange(1797), test_size=0.2, random_state=3, stratify=digits.target
  )
  train_idx = np.sort(train_idx)
  np.testing.assert_array_equal(ds.y_train, digits.target[train_idx])
  raw = ds.x_train * ds.std + ds.mean
  np.testing.assert_allclose(raw[..., 0], digits.images[train_idx], atol=1e-4)


def test_digits_is_stable_for_a_seed_and_changes_with_it():
  first = data.load_dataset(**_config(split_seed=1))
  again = data.load_dataset(**_config(split_seed=1))
  other = data.load_dataset(**_config(split_seed=2))
  np.testing.assert_array_equal(first.x_train, again.x_train)
  np.testing.assert_array_equal(first.y_test, again.y_test)
  assert not np.array_equal(first.y_train, other.y_train)


@pytest.mark.parametrize('fraction', [0.0, 1.0, 1.5, -0.2])
def test_digits_rejects_test_fraction_outside_unit_interval(fraction):
  with pytest.raises(UserInputError, match=f'data.test_fraction {fraction}'):
    data.load_dataset(**_config(test_fraction=fraction))


def test_digits_rejects_test_split_smaller_than_class_count():
  with pytest.raises(UserInputError, match='data.test_fraction 0.001'):
    data.load_dataset(**_config(test_fraction=0.001))


# User .npz files.


def _save(tmp_path, **arrays):
  path = tmp_path / 'data.npz'
  np.savez(path, **arrays)
  return str(path)


def _valid_arrays(**overrides):
  rng = np.random.default_rng(0)
  arrays = {
    'x_train': rng.integers(0, 256, (6, 8, 8), dtype=np.uint8),
    'y_train': np.array([0, 1, 2, 0, 1, 2], np.int64),
    'x_test': rng.integers(0, 256, (3, 8, 8), dtype=np.uint8),
    'y_test': np.array([2, 1, 0], np.int64),
  }
  arrays.update(overrides)
  return {k: v for k, v in arrays.items() if v is not None}


def test_npz_round_trip_grey_uint8_with_test_split(tmp_path):
  arrays = _valid_arrays()
  ds = data.load_dataset(**_config(name='npz', path=_save(tmp_path, **arrays)))
  assert ds.x_train.shape == (6, 8, 8, 1) and ds.x_test.shape == (3, 8, 8, 1)
  assert ds.num_classes == 3 and not ds.augment and ds.name == 'npz'
  np.testing.assert_array_equal(ds.y_train, arrays['y_train'])
  np.testing.assert_array_equal(ds.y_test, arrays['y_test'])
  np.testing.assert_allclose(ds.x_test[..., 0] * ds.std + ds.mean, arrays['x_test'], atol=1e-3)
  np.testing.assert_allclose(ds.mean, arrays['x_train'].mean(), rtol=1e-6)
  _assert_normalised(ds)


def test_npz_round_trip_colour_float_without_test_split(tmp_path):
  x = np.random.default_rng(1).normal(5.0, 2.0, (4, 32, 32, 3))
  path = _save(tmp_path, x_train=x, y_train=np.array([0, 1, 1, 3], np.uint8))
  ds = data.load_dataset(**_config(name='npz', path=path))
  assert ds.x_train.shape == (4, 32, 32, 3) and ds.x_test.shape == (0, 32, 32, 3)
  assert ds.y_test.shape == (0,) and ds.y_test.dtype == np.int32
  assert ds.num_classes == 4 and ds.augment
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-6)
  _assert_normalised(ds)


def test_npz_accepts_keras_column_labels(tmp_path):
  path = _save(tmp_path, **_valid_arrays(y_train=np.array([[0], [1], [2], [0], [1], [2]])))
  ds = data.load_dataset(**_config(name='npz', path=path))
  np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 0, 1, 2])


def test_npz_constant_channel_does_not_divide_by_zero(tmp_path):
  path = _save(tmp_path, **_valid_arrays(x_train=np.zeros((6, 8, 8), np.uint8)))
  ds = data.load_dataset(**_config(name='npz', path=path))
  assert np.all(np.isfinite(ds.x_train)) and np.all(np.isfinite(ds.x_test))


def test_npz_requires_a_path():
  with pytest.raises(UserInputError, match="data.path is required for data.name='npz'"):
    data.load_dataset(**_config(name='npz'))


_NAN_IMAGES = np.zeros((6, 8, 8), np.float32)
_NAN_IMAGES[3, 2, 1] = np.nan
_INF_TEST_IMAGES = np.zeros((3, 8, 8), np.float64)
_INF_TEST_IMAGES[1, 0, 0] = np.inf

# (overrides of the valid arrays, substrings the message must contain); None drops a key.
_BAD_ARRAYS = {
  'missing x_train': ({'x_train': None}, ["'x_train' is missing", "'y_train'"]),
  'missing y_train': ({'y_train': None}, ["'y_train' is missing", "'x_train'"]),
  'x_test without y_test': ({'y_test': None}, ["'x_test' is present but 'y_test' is missing"]),
  'y_test without x_test': ({'x_test': None}, ["'y_test' is present but 'x_test' is missing"]),
  'short labels': (
    {'y_train': np.array([0, 1, 2, 0, 1])},
    ["key 'y_train' has 5 entries but 'x_train' has 6 images"],
  ),
  'short test labels': ({'y_test': np.array([0, 1])}, ["'y_test' has 2 entries but 'x_test'"]),
  'object images': ({'x_train': np.array([None] * 6)}, ["'x_train'", 'object (pickled)']),
  'bool images': ({'x_train': np.zeros((6, 8, 8), bool)}, ["'x_train'", 'dtype bool']),
  'complex images': ({'x_train': np.zeros((6, 8, 8), complex)}, ["'x_train'", 'complex128']),
  'string images': ({'x_train': np.array(['a'] * 6)}, ["'x_train'", 'dtype <U1']),
  '1-D images': ({'x_train': np.zeros(6, np.uint8)}, ["'x_train'", 'shape (6,)']),
  '2-D images': ({'x_train': np.zeros((6, 8), np.uint8)}, ["'x_train'", 'shape (6, 8)']),
  '5-D images': ({'x_train': np.zeros((6, 2, 2, 2, 2))}, ["'x_train'", 'shape (6, 2, 2, 2, 2)']),
  'empty images': ({'x_train': np.zeros((6, 0, 8))}, ["'x_train'", 'empty images']),
  'NaN pixel': ({'x_train': _NAN_IMAGES}, ["'x_train'", 'NaN or inf', 'image 3']),
  'inf test pixel': ({'x_test': _INF_TEST_IMAGES}, ["'x_test'", 'NaN or inf', 'image 1']),
  'empty train split': (
    {'x_train': np.zeros((0, 8, 8)), 'y_train': np.zeros(0, int)},
    ["'x_train'", '0 images'],
  ),
  'empty test split': (
    {'x_test': np.zeros((0, 8, 8)), 'y_test': np.zeros(0, int)},
    ["'x_test'", '0 images'],
  ),
  'test image shape': ({'x_test': np.zeros((3, 9, 8))}, ["'x_test'", '(9, 8, 1)', '(8, 8, 1)']),
  'test channels': ({'x_test': np.zeros((3, 8, 8, 3))}, ["'x_test'", '(8, 8, 3)']),
  'float labels': ({'y_train': np.array([0.0, 1, 2, 0, 1, 2])}, ["'y_train'", 'dtype float64']),
  'bool labels': ({'y_train': np.ones(6, bool)}, ["'y_train'", 'dtype bool']),
  'string labels': ({'y_train': np.array(list('abcabc'))}, ["'y_train'", 'dtype <U1']),
  '2-D labels': ({'y_train': np.zeros((6, 2), int)}, ["'y_train'", 'shape (6, 2)']),
  'negative label': (
    {'y_train': np.array([0, 1, -1, 0, 1, 2])},
    ["'y_train'", 'negative label -1 at index 2'],
  ),
  'negative test label': (
    {'y_test': np.array([0, -3, 1])},
    ["'y_test'", 'negative label -3 at index 1'],
  ),
  'label out of range': (
    {'y_train': np.array([0, 1, 2, 0, 1, 2**40])},
    ["'y_train'", f'label {2**40} at index 5', 'out of range'],
  ),
  'test label beyond the training classes': (
    {'y_test': np.array([0, 20, 1])},
    ["'y_test' has label 20 at index 1", "'y_train' has labels 0..2 only"],
  ),
  'one class': (
    {'y_train': np.zeros(6, int), 'y_test': np.zeros(3, int)},
    ["'y_train' and 'y_test' hold only class 0", 'at least 2 classes'],
  ),
}


@pytest.mark.parametrize('case', list(_BAD_ARRAYS))
def test_npz_rejects_bad_arrays(tmp_path, case):
  overrides, expected = _BAD_ARRAYS[case]
  path = _save(tmp_path, **_valid_arrays(**overrides))
  with pytest.raises(UserInputError) as info:
    data.load_dataset(**_config(name='npz', path=path))
  message = str(info.value)
  assert f'data file {path}' in message
  for part in expected:
    assert part in message


def _write_bytes(tmp_path, name, payload):
  path = tmp_path / name
  path.write_bytes(payload)
  return str(path)


@pytest.mark.parametrize(
  'make,expected',
  [
    (lambda tmp: str(tmp / 'absent.npz'), 'no such file'),
    (lambda tmp: _write_bytes(tmp, 'junk.npz', b'not numpy at all'), 'is a text file'),
    (lambda tmp: _write_bytes(tmp, 'cut.npz', b'PK\x03\x04' + b'\0' * 20), 'truncated'),
    (lambda tmp: _write_bytes(tmp, 'empty.npz', b''), 'is empty'),
    (lambda tmp: _write_bytes(tmp, 'bin.npz', bytes(range(128, 256))), 'unknown binary'),
    (lambda tmp: str(tmp), 'is a directory'),
  ],
)
def test_npz_rejects_unreadable_files(tmp_path, make, expected):
  path = make(tmp_path)
  with pytest.raises(UserInputError) as info:
    data.load_dataset(**_config(name='npz', path=path))
  assert f'data file {path}' in str(info.value) and expected in str(info.value)


def test_npz_rejects_a_single_npy_array(tmp_path):
  path = tmp_path / 'x.npy'
  np.save(path, np.zeros((6, 8, 8)))
  with pytest.raises(UserInputError, match='single array'):
    data.load_dataset(**_config(name='npz', path=str(path)))


# TFDS (mocked: nothing is read from disk or the network).


@pytest.mark.parametrize(
  'name,shape,augment', [('cifar10', (32, 32, 3), True), ('mnist', (28, 28, 1), False)]
)
def test_tfds_mocked_shapes(name, shape, augment):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_dataset(**_config(name=name))
  assert ds.x_train.shape == (6, *shape) and ds.x_test.shape == (6, *shape)
  assert ds.y_train.shape == (6,) and ds.y_train.dtype == np.int32
  assert ds.num_classes == 10 and ds.augment is augment and ds.name == name
  assert ds.mean.shape == (shape[-1],)
  assert np.all((ds.y_train >= 0) & (ds.y_train < 10))
  _assert_normalised(ds)


class _FakeSource:
  """A random-access split whose example k has a 2x2x3 image of value k and label k % 10."""

  def __init__(self, keys, dataset_info):
    self.keys, self.dataset_info = keys, dataset_info

  def __len__(self):
    return len(self.keys)

  def __getitem__(self, i):
    k = self.keys[i]
    return {'image': np.full((2, 2, 3), k % 251, np.uint8), 'label': np.int64(k % 10)}


def _fake_as_data_source(split_sizes, requested):
  """A `DatasetBuilder.as_data_source` that honours 'train[a:b]' slices, unlike tfds' mock."""

  def as_data_source(self, split, **kwargs):
    del kwargs
    requested.append(split)
    base, _, spec = split.partition('[')
    if base not in split_sizes:
      raise ValueError(f'Unknown split {base!r}. Should be one of {list(split_sizes)}.')
    start, _, stop = spec.rstrip(']').partition(':')
    keys = range(split_sizes[base])[slice(int(start or 0), int(stop) if stop else None)]
    return _FakeSource(keys, self.info)

  return as_data_source


def test_tfds_cifar_keeps_the_first_45000_training_examples():
  requested = []
  fake = _fake_as_data_source({'train': 45_007, 'test': 7}, requested)
  with tfds.testing.mock_data(as_data_source_fn=fake):
    ds = data.load_dataset(**_config(name='cifar10'))
  assert requested == ['train[:45000]', 'test']
  np.testing.assert_array_equal(ds.y_train, np.arange(45_000) % 10)
  np.testing.assert_array_equal(ds.y_test, np.arange(7) % 10)
  assert ds.num_classes == 10


def test_tfds_other_data_sets_use_whole_train_and_test():
  requested = []
  fake = _fake_as_data_source({'train': 12, 'test': 5}, requested)
  with tfds.testing.mock_data(as_data_source_fn=fake):
    ds = data.load_dataset(**_config(name='fashion_mnist'))
  assert requested == ['train', 'test']
  assert len(ds.y_train) == 12 and len(ds.y_test) == 5


def test_tfds_missing_split_is_a_user_error():
  fake = _fake_as_data_source({'train': 12}, [])
  with tfds.testing.mock_data(as_data_source_fn=fake):
    with pytest.raises(UserInputError, match="cannot open split 'test'"):
      data.load_dataset(**_config(name='mnist'))


@pytest.mark.parametrize('name,hint', [('nonexistent_xyz', ''), ('cifar', "'cifar10'")])
def test_tfds_unknown_name_lists_builtin_names(name, hint):
  with pytest.raises(UserInputError) as info:
    data.load_dataset(**_config(name=name))
  message = str(info.value)
  assert repr(name) in message and "'digits'" in message and "'npz'" in message
  assert hint in message


def test_tfds_unprepared_data_set_says_how_to_prepare(tmp_path):
  with pytest.raises(UserInputError) as info:
    data.load_dataset(**_config(name='mnist', data_dir=str(tmp_path)))
  message = str(info.value)
  assert 'not prepared' in message and str(tmp_path) in message
  assert 'tfds build mnist --file_format=array_record' in message
