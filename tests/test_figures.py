"""Tests for aul_jax.figures: valid PNG bytes for every figure, AUROC curves, edge cases."""

import io
import itertools
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from matplotlib import image as mpl_image
from sklearn.metrics import roc_auc_score

from aul_jax import figures
from aul_jax.gmm import GaussianMixture

N, T, H, W = 300, 12, 8, 8


def _mixture(weights=(0.7, 0.3), means=(5.0, 15.0), variances=(2.0, 4.0)) -> GaussianMixture:
  """A 2-component mixture as `gmm.fit` returns it (components in any order)."""
  return GaussianMixture(
    weights=np.asarray(weights),
    means=np.asarray(means),
    variances=np.asarray(variances),
    log_likelihood=np.asarray(0.0),
    n_iter=np.asarray(1),
    converged=np.asarray(True),
  )


def _run(seed: int = 0, n: int = N, t: int = T) -> dict:
  """A small synthetic run: 30% mislabeled examples whose losses decay more slowly."""
  rng = np.random.default_rng(seed)
  truth_N = np.arange(n) < int(0.3 * n)
  epochs_T = np.arange(1, t + 1)
  decay_NxT = np.exp(-epochs_T / np.where(truth_N[:, None], 8.0, 2.0))
  history_NxT = 2.3 * decay_NxT * rng.lognormal(0, 0.5, (n, t))
  labels_N = rng.integers(0, 10, n)
  true_labels_N = np.where(truth_N, (labels_N + 1) % 10, labels_N)
  return {
    'aul_N': history_NxT.sum(1),
    'is_mislabeled_N': truth_N,
    'history_NxT': history_NxT.astype(np.float32),
    'images_NxHxWxC': rng.integers(0, 256, (n, H, W, 1)).astype(np.uint8),
    'labels_N': labels_N,
    'true_labels_N': true_labels_N,
  }


def _decode(png: bytes) -> np.ndarray:
  """Decodes PNG bytes, checking they are a real, non-blank image."""
  assert isinstance(png, bytes) and png.startswith(b'\x89PNG\r\n\x1a\n')
  pixels = mpl_image.imread(io.BytesIO(png), format='png')
  assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
  assert pixels.shape[0] >= 100 and pixels.shape[1] >= 100
  assert np.ptp(pixels[..., :3]) > 0, 'figure is a single flat colour'
  return pixels


# ------------------------------------------------------------------- every figure


@pytest.mark.parametrize('with_truth', [False, True])
def test_aul_histogram_is_png_of_expected_size(with_truth):
  run = _run()
  truth = run['is_mislabeled_N'] if with_truth else None
  pixels = _decode(figures.aul_histogram(run['aul_N'], _mixture(), truth))
  assert pixels.shape[:2] == (450, 800)


def test_aul_histogram_accepts_jax_mixture_in_any_component_order():
  import jax.numpy as jnp

  mixture = _mixture(weights=(0.3, 0.7), means=(15.0, 5.0), variances=(4.0, 2.0))
  mixture = mixture._replace(**{k: jnp.asarray(getattr(mixture, k)) for k in mixture._fields})
  _decode(figures.aul_histogram(jnp.asarray(_run()['aul_N']), mixture))


@pytest.mark.parametrize('epochs', [None, [1, 5, T]])
def test_loss_and_aul_histograms(epochs):
  run = _run()
  _decode(figures.loss_and_aul_histograms(run['history_NxT'], run['is_mislabeled_N'], epochs))


def test_auroc_per_epoch():
  run = _run()
  _decode(figures.auroc_per_epoch(run['history_NxT'], run['is_mislabeled_N']))


@pytest.mark.parametrize('channels', [None, 1, 2, 3, 4])
def test_top_aul_images(channels):
  rng = np.random.default_rng(1)
  shape = (12, H, W) if channels is None else (12, H, W, channels)
  images = rng.normal(size=shape).astype(np.float32)  # normalised floats, not pixel units
  labels = rng.integers(0, 3, 12)
  png = figures.top_aul_images(
    images,
    labels,
    rng.random(12),
    count=10,
    true_labels_N=(labels + 1) % 3,
    class_names=['cat', 'dog', 'bird'],
  )
  _decode(png)


@pytest.mark.parametrize('shape', [(8, 8), (12, 40)])
def test_top_aul_images_draws_each_tile_whole_and_apart(shape):
  """Every tile of the mosaic is drawn at its size (the longer side 1.2 inches at 100 dpi),
  with gaps between tiles: black images give that many black pixels, in separate blobs."""
  count = 10
  pixels = _decode(
    figures.top_aul_images(np.zeros((count, *shape)), np.zeros(count), np.ones(count))
  )
  black = pixels[..., :3].max(axis=-1) < 0.05
  h, w = shape
  tile = (120 * h / max(h, w)) * (120 * w / max(h, w))
  assert abs(black.sum() / (count * tile) - 1) < 0.1
  # 8 tiles in the first row, 2 in the second: 8 runs of black along a row through them.
  row = black[np.argmax(black.sum(axis=1))]
  assert np.count_nonzero(np.diff(row.astype(int)) == 1) == 8


def test_top_aul_images_fewer_images_than_count():
  run = _run(n=5)
  _decode(figures.top_aul_images(run['images_NxHxWxC'], run['labels_N'], run['aul_N'], count=32))


# -------------------------------------------------------------------- run_figures

_OPTIONAL = ('is_mislabeled_N', 'history_NxT', 'images_NxHxWxC', 'labels_N', 'true_labels_N')


def _expected_keys(given: set[str]) -> set[str]:
  """The figure names the brief promises for a given set of optional inputs."""
  keys = {'aul_histogram.png'}
  if {'images_NxHxWxC', 'labels_N'} <= given:
    keys.add('top_aul_images.png')
  if {'history_NxT', 'is_mislabeled_N'} <= given:
    keys |= {'loss_aul_histograms.png', 'auroc_per_epoch.png'}
  return keys


_COMBOS = [set(c) for r in range(len(_OPTIONAL) + 1) for c in itertools.combinations(_OPTIONAL, r)]
# Every combination that changes the answer, and a few that should not.
_CASES = [
  set(),
  {'is_mislabeled_N'},
  {'history_NxT'},
  {'history_NxT', 'is_mislabeled_N'},
  {'images_NxHxWxC'},
  {'labels_N', 'true_labels_N'},
  {'images_NxHxWxC', 'labels_N'},
  set(_OPTIONAL),
]


@pytest.mark.parametrize('given', _CASES, ids=lambda g: '+'.join(sorted(g)) or 'aul_only')
def test_run_figures_keys(given):
  run = _run(n=12, t=4)
  inputs = {k: run[k] for k in given}
  out = figures.run_figures(aul_N=run['aul_N'], mixture=_mixture(), **inputs)
  assert set(out) == _expected_keys(given)
  for png in out.values():
    _decode(png)


def test_expected_keys_cover_every_combination():
  # Guards the case list: each distinct answer over all 32 combinations is exercised.
  assert {frozenset(_expected_keys(g)) for g in _COMBOS} == {
    frozenset(_expected_keys(g)) for g in _CASES
  }


# ------------------------------------------------------------------- auroc_curves


def _memorizing_run(n: int = 2000, t: int = 40, seed: int = 0):
  """Mislabeled losses are higher by a margin that fades (memorisation); each epoch is noisy."""
  rng = np.random.default_rng(seed)
  truth_N = rng.random(n) < 0.4
  margin_T = 0.6 * np.exp(-np.arange(t) / 8)
  history_NxT = 1.0 + truth_N[:, None] * margin_T + rng.normal(0, 1.0, (n, t))
  return history_NxT, truth_N


def test_aul_auroc_beats_loss_auroc_late_in_training():
  history_NxT, truth_N = _memorizing_run()
  loss_auroc_T, aul_auroc_T = figures.auroc_curves(history_NxT, truth_N)
  assert loss_auroc_T.shape == aul_auroc_T.shape == (40,)
  assert loss_auroc_T[0] == aul_auroc_T[0]  # after one epoch the AUL is the loss
  assert np.all(aul_auroc_T[-10:] > loss_auroc_T[-10:] + 0.1), (loss_auroc_T, aul_auroc_T)
  assert np.all(aul_auroc_T[-10:] > 0.65)


def test_auroc_curves_match_sklearn_with_ties():
  history_NxT, truth_N = _memorizing_run(n=500, t=5)
  history_NxT = np.round(history_NxT, 1)  # many tied scores
  loss_auroc_T, aul_auroc_T = figures.auroc_curves(history_NxT, truth_N)
  aul_NxT = np.cumsum(history_NxT, axis=1)
  for t in range(5):
    assert loss_auroc_T[t] == pytest.approx(roc_auc_score(truth_N, history_NxT[:, t]), abs=1e-12)
    assert aul_auroc_T[t] == pytest.approx(roc_auc_score(truth_N, aul_NxT[:, t]), abs=1e-12)


@pytest.mark.parametrize('mislabeled', [False, True])
def test_auroc_curves_nan_with_one_class(mislabeled):
  history_NxT, _ = _memorizing_run(n=50, t=3)
  truth_N = np.full(50, mislabeled)
  loss_auroc_T, aul_auroc_T = figures.auroc_curves(history_NxT, truth_N)
  assert loss_auroc_T.shape == (3,) and np.isnan(loss_auroc_T).all() and np.isnan(aul_auroc_T).all()
  _decode(figures.auroc_per_epoch(history_NxT, truth_N))
  _decode(figures.loss_and_aul_histograms(history_NxT, truth_N))


# --------------------------------------------------------------- degenerate inputs


def test_single_epoch():
  run = _run(n=10, t=1)
  out = figures.run_figures(
    aul_N=run['aul_N'], mixture=_mixture(), **{k: run[k] for k in _OPTIONAL}
  )
  assert len(out) == 4


def test_constant_aul_and_losses():
  history_NxT = np.ones((20, 3))
  truth_N = np.arange(20) < 5
  collapsed = _mixture(weights=(1.0, 0.0), means=(3.0, 3.0), variances=(1e-12, 1e-12))
  _decode(figures.aul_histogram(history_NxT.sum(1), collapsed, truth_N))
  _decode(figures.loss_and_aul_histograms(history_NxT, truth_N))
  loss_auroc_T, aul_auroc_T = figures.auroc_curves(history_NxT, truth_N)
  np.testing.assert_array_equal(loss_auroc_T, 0.5)  # all ties: chance
  np.testing.assert_array_equal(aul_auroc_T, 0.5)


def test_three_examples():
  run = _run(n=3, t=2)
  out = figures.run_figures(
    aul_N=run['aul_N'], mixture=_mixture(), **{k: run[k] for k in _OPTIONAL}
  )
  assert len(out) == 4


def test_constant_image():
  images = np.zeros((2, H, W, 3))
  _decode(figures.top_aul_images(images, np.array([0, 1]), np.array([1.0, 2.0])))


# -------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
  'call',
  [
    lambda r: figures.loss_and_aul_histograms(r['history_NxT'], r['is_mislabeled_N'], [0]),
    lambda r: figures.loss_and_aul_histograms(r['history_NxT'], r['is_mislabeled_N'], [T + 1]),
    lambda r: figures.auroc_curves(r['history_NxT'], r['is_mislabeled_N'][:-1]),
    lambda r: figures.auroc_curves(r['aul_N'], r['is_mislabeled_N']),
    lambda r: figures.aul_histogram(r['aul_N'], _mixture((1 / 3,) * 3, (1, 2, 3), (1, 1, 1))),
    lambda r: figures.top_aul_images(r['images_NxHxWxC'], r['labels_N'][:-1], r['aul_N']),
    lambda r: figures.top_aul_images(r['images_NxHxWxC'], r['labels_N'], r['aul_N'], count=0),
  ],
  ids=[
    'epoch_0',
    'epoch_past_end',
    'truth_length',
    'history_1d',
    'three_components',
    'labels_length',
    'count_0',
  ],
)
def test_bad_inputs_raise_value_error(call):
  with pytest.raises(ValueError):
    call(_run(n=20))


# --------------------------------------------------------------- global state


def test_renders_identically_from_threads():
  run = _run(n=100, t=4)
  serial = figures.aul_histogram(run['aul_N'], _mixture(), run['is_mislabeled_N'])
  with ThreadPoolExecutor(4) as pool:
    futures = [
      pool.submit(figures.aul_histogram, run['aul_N'], _mixture(), run['is_mislabeled_N'])
      for _ in range(4)
    ]
    assert all(f.result() == serial for f in futures)


def test_does_not_use_pyplot():
  code = (
    'import sys, numpy as np; from aul_jax import figures; '
    'from collections import namedtuple; '
    "M = namedtuple('M', 'weights means variances'); "
    'figures.aul_histogram(np.arange(9.0), M(np.r_[.5, .5], np.r_[2., 7.], np.r_[1., 1.])); '
    "assert 'matplotlib.pyplot' not in sys.modules"
  )
  repo = pathlib.Path(__file__).resolve().parents[1]
  subprocess.run([sys.executable, '-c', code], check=True, cwd=repo)
