"""PNG figures of a run (paper Figures 1, 2, 6 and 8), returned as bytes, never written here.

Every public function renders a `matplotlib.figure.Figure` on its own Agg canvas and returns
the PNG bytes, so the caller can write all outputs at once (`outputs.write_files`), nothing
touches pyplot's global state, and rendering needs no display and is safe in threads.
Histograms are binned with numpy and drawn with `ax.stairs`, so N = 50,000 renders fast.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from aul_jax import checks, metrics

CLEAN_COLOR = 'tab:blue'
MISLABELED_COLOR = 'tab:orange'
_DPI = 100
_MAX_BINS = 100


# --------------------------------------------------------------------------- helpers


def png(fig: Figure) -> bytes:
  """Renders fig with Agg into PNG bytes: every figure of the package goes through here."""
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=_DPI)
  fig.clear()
  return buffer.getvalue()


def _grid(
  fig: Figure,
  nrows: int,
  ncols: int,
  *,
  left: float,
  right: float,
  top: float,
  bottom: float,
  wspace: float,
  hspace: float,
) -> np.ndarray:
  """(nrows, ncols) axes with fixed margins and gaps in inches: for a figure of many panels,
  whose constrained layout took as long as the drawing."""
  width, height = fig.get_size_inches()
  cell_w = (width - left - right - wspace * (ncols - 1)) / ncols
  cell_h = (height - top - bottom - hspace * (nrows - 1)) / nrows
  return fig.subplots(
    nrows,
    ncols,
    squeeze=False,
    gridspec_kw=dict(
      left=left / width,
      right=1 - right / width,
      top=1 - top / height,
      bottom=bottom / height,
      wspace=wspace / cell_w,
      hspace=hspace / cell_h,
    ),
  )


def _num_bins(n: int) -> int:
  """Rice's rule, 2 n^(1/3), kept within [10, 100] so small and huge N both read well."""
  return int(np.clip(round(2 * n ** (1 / 3)), 10, _MAX_BINS))


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
  """Bin edges over the range of values, widened when every value is the same."""
  lo, hi = float(np.min(values)), float(np.max(values))
  if not hi > lo:
    pad = 0.05 * max(abs(lo), 1.0)
    lo, hi = lo - pad, hi + pad
  return np.linspace(lo, hi, bins + 1)


def _density(values: np.ndarray, edges: np.ndarray, total: int) -> np.ndarray:
  """Histogram of values normalised by `total` samples: integrates to len(values) / total."""
  counts, _ = np.histogram(values, bins=edges)
  return counts / (max(total, 1) * np.diff(edges))


def _format_auroc(value: float) -> str:
  """'AUROC 0.912', or 'AUROC n/a' when one class is missing."""
  return 'AUROC n/a' if math.isnan(value) else f'AUROC {value:.3f}'


def _as_truth(is_mislabeled_N: Any, n: int) -> np.ndarray:
  """The truth mask as a bool (N,) array; raises ValueError on a length mismatch."""
  truth_N = np.asarray(is_mislabeled_N).astype(bool).reshape(-1)
  if truth_N.shape != (n,):
    raise ValueError(f'is_mislabeled_N must have shape ({n},); got {truth_N.shape}')
  return truth_N


def _as_history(history_NxT: Any) -> np.ndarray:
  """The loss history as a float (N, T) array; raises ValueError on another shape."""
  history_NxT = np.asarray(history_NxT)
  if history_NxT.ndim != 2 or 0 in history_NxT.shape:
    raise ValueError(f'history_NxT must be a non-empty (N, T) array; got {history_NxT.shape}')
  return history_NxT


def _class_stairs(ax, values_N: np.ndarray, truth_N: np.ndarray, edges: np.ndarray) -> None:
  """Draws each class's own density histogram as filled stairs, clean blue, mislabeled orange."""
  classes = ((~truth_N, CLEAN_COLOR, 'clean'), (truth_N, MISLABELED_COLOR, 'mislabeled'))
  for mask_N, color, name in classes:
    n = int(mask_N.sum())
    if n:
      density = _density(values_N[mask_N], edges, n)
      ax.stairs(density, edges, fill=True, alpha=0.45, color=color, label=f'{name} (n={n})')


# ------------------------------------------------------------------ Fig. 6: AUL + GMM


def _sorted_mixture(mixture: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(weights, means, variances) of a 2-component mixture as float64, by ascending mean."""
  params = [
    np.asarray(p, np.float64).reshape(-1)
    for p in (mixture.weights, mixture.means, mixture.variances)
  ]
  if any(p.shape != (2,) for p in params):
    shapes = ', '.join(str(p.shape) for p in params)
    raise ValueError(f'mixture must have 2 components of 1-D data; got shapes {shapes}')
  order = np.argsort(params[1])
  return tuple(p[order] for p in params)


def _component_densities(grid_G: np.ndarray, weights, means, variances) -> np.ndarray:
  """weight * normal pdf of each component on the grid, (2, G)."""
  var_K = np.maximum(variances, np.finfo(np.float64).tiny)[:, None]
  z2 = (grid_G[None, :] - means[:, None]) ** 2 / var_K
  return weights[:, None] * np.exp(-0.5 * z2) / np.sqrt(2 * np.pi * var_K)


def _draw_aul_histogram(ax, aul_N: np.ndarray, truth_N: np.ndarray | None, edges) -> np.ndarray:
  """Draws the AUL density, stacked clean + mislabeled when the truth is known; returns it."""
  total = _density(aul_N, edges, aul_N.size)
  if truth_N is None:
    ax.stairs(total, edges, fill=True, color='0.75', label=f'all (n={aul_N.size})')
    return total
  clean = _density(aul_N[~truth_N], edges, aul_N.size)
  n_clean, n_mislabeled = int((~truth_N).sum()), int(truth_N.sum())
  ax.stairs(clean, edges, fill=True, alpha=0.4, color=CLEAN_COLOR, label=f'clean (n={n_clean})')
  ax.stairs(
    total,
    edges,
    baseline=clean,
    fill=True,
    alpha=0.4,
    color=MISLABELED_COLOR,
    label=f'mislabeled (n={n_mislabeled})',
  )
  return total


def _draw_mixture(ax, edges: np.ndarray, weights, means, variances) -> float:
  """Draws each weighted Gaussian component and their sum; returns the sum's peak."""
  inside = means[(means >= edges[0]) & (means <= edges[-1])]
  grid = np.union1d(np.linspace(edges[0], edges[-1], 512), inside)
  curves = _component_densities(grid, weights, means, variances)
  ax.plot(grid, curves.sum(0), color='black', lw=1, label='GMM sum')
  styles = ((CLEAN_COLOR, 'clean'), (MISLABELED_COLOR, 'mislabeled'))
  for curve, (color, name), w in zip(curves, styles, weights, strict=True):
    ax.plot(grid, curve, color=color, lw=2, ls='--', label=f'GMM {name} (w={w:.2f})')
  return float(curves.sum(0).max())


def aul_histogram(aul_N: Any, mixture: Any, is_mislabeled_N: Any = None) -> bytes:
  """Fig. 6: the AUL histogram with the two fitted Gaussians, to judge the GMM fit by eye.

  With the truth, the clean and mislabeled histograms are stacked (their sum is the AUL
  density), so each can be compared with its weighted Gaussian component.
  """
  aul_N = np.asarray(aul_N, np.float64).reshape(-1)
  truth_N = None if is_mislabeled_N is None else _as_truth(is_mislabeled_N, aul_N.size)
  weights, means, variances = _sorted_mixture(mixture)
  edges = _edges(aul_N, _num_bins(aul_N.size))
  fig = Figure(figsize=(8, 4.5), layout='constrained')
  ax = fig.add_subplot()
  total = _draw_aul_histogram(ax, aul_N, truth_N, edges)
  peak = _draw_mixture(ax, edges, weights, means, variances)
  # A near-zero variance makes a spike that would flatten the histogram; let it run off-axis.
  ax.set_ylim(0, 1.1 * max(total.max(), min(peak, 2 * total.max())))
  # This is the paper's detector, whichever detector the run used (summary.json names it).
  title = (
    "AUL distribution and the paper's detector (one GMM on the AUL, not the run's detector)\n"
    f'its estimated noise {weights[1]:.1%} (higher-mean weight)'
  )
  if truth_N is not None:
    title += f', true {truth_N.mean():.1%}'
  ax.set(title=title, xlabel='AUL (area under the loss curve)', ylabel='density')
  ax.legend(fontsize=8)
  return png(fig)


# ----------------------------------------------------- Fig. 2: loss and AUL histograms


def _default_epochs(num_epochs: int) -> list[int]:
  """1-based epochs spread over training: first, 1/4, 1/2 and last, without repeats."""
  picks = (1, round(num_epochs / 4), round(num_epochs / 2), num_epochs)
  return sorted({min(max(int(e), 1), num_epochs) for e in picks})


def _check_epochs(epochs: Sequence[int], num_epochs: int) -> list[int]:
  """The epochs as ints; raises ValueError unless each is in [1, num_epochs]."""
  epochs = [int(e) for e in epochs]
  bad = [e for e in epochs if not 1 <= e <= num_epochs]
  if not epochs or bad:
    raise ValueError(
      f'epochs must be a non-empty list of 1-based epochs in [1, {num_epochs}]; got {epochs}'
    )
  return epochs


def _class_panel(ax, values_N: np.ndarray, truth_N: np.ndarray, title: str, legend: bool) -> None:
  """One Fig. 2 panel: per-class density histograms of values, titled with their AUROC."""
  edges = _edges(values_N, _num_bins(values_N.size))
  _class_stairs(ax, values_N, truth_N, edges)
  ax.set_title(f'{title}\n{_format_auroc(metrics.auroc(values_N, truth_N))}', fontsize=9)
  ax.tick_params(labelsize=7)
  if legend:
    ax.legend(fontsize=7)


def loss_and_aul_histograms(
  history_NxT: Any, is_mislabeled_N: Any, epochs: Sequence[int] | None = None
) -> bytes:
  """Fig. 2: loss (top) and AUL (bottom) histograms at a few epochs, clean vs mislabeled.

  Shows why AUL beats the loss: the loss separates the classes early and loses it once
  the network memorises, while the AUL up to an epoch stays separated.
  """
  history_NxT = _as_history(history_NxT)
  truth_N = _as_truth(is_mislabeled_N, history_NxT.shape[0])
  num_epochs = history_NxT.shape[1]
  epochs = _default_epochs(num_epochs) if epochs is None else _check_epochs(epochs, num_epochs)
  fig = Figure(figsize=(min(12, max(6, 0.5 + 3 * len(epochs))), 6))
  axes = _grid(
    fig, 2, len(epochs), left=0.6, right=0.15, top=0.75, bottom=0.3, wspace=0.4, hspace=0.65
  )
  for col, epoch in enumerate(epochs):
    loss_N = np.asarray(history_NxT[:, epoch - 1], np.float64)
    aul_N = np.sum(history_NxT[:, :epoch], axis=1, dtype=np.float64)
    _class_panel(axes[0, col], loss_N, truth_N, f'loss at epoch {epoch}', legend=col == 0)
    _class_panel(axes[1, col], aul_N, truth_N, f'AUL up to epoch {epoch}', legend=False)
  axes[0, 0].set_ylabel('density (per class)')
  axes[1, 0].set_ylabel('density (per class)')
  fig.suptitle('Training loss vs AUL as a detector of mislabeled examples', fontsize=11)
  return png(fig)


# ------------------------------------------------------------- Fig. 8: AUROC by epoch


def auroc_curves(history_NxT: Any, is_mislabeled_N: Any) -> tuple[np.ndarray, np.ndarray]:
  """AUROC per epoch of the loss and of the running AUL, (T,) each; NaN with one class.

  Returns:
    (loss_auroc_T, aul_auroc_T): entry t scores examples by their loss at epoch t + 1 and
    by their summed loss over epochs 1..t + 1.
  """
  history_NxT = _as_history(history_NxT)
  truth_N = _as_truth(is_mislabeled_N, history_NxT.shape[0])
  num_epochs = history_NxT.shape[1]
  if truth_N.all() or not truth_N.any():
    return np.full(num_epochs, np.nan), np.full(num_epochs, np.nan)
  # Epoch-major copies keep each column contiguous for the per-epoch sorts.
  loss_TxN = np.ascontiguousarray(history_NxT.T, np.float64)
  aul_TxN = np.cumsum(loss_TxN, axis=0)
  loss_auroc_T = np.array([metrics.auroc(row, truth_N) for row in loss_TxN])
  aul_auroc_T = np.array([metrics.auroc(row, truth_N) for row in aul_TxN])
  return loss_auroc_T, aul_auroc_T


def auroc_per_epoch(history_NxT: Any, is_mislabeled_N: Any) -> bytes:
  """Fig. 8-style: AUROC of the per-epoch loss and of the running AUL against the epoch."""
  loss_auroc_T, aul_auroc_T = auroc_curves(history_NxT, is_mislabeled_N)
  epochs_T = np.arange(1, loss_auroc_T.size + 1)
  fig = Figure(figsize=(7, 4.5), layout='constrained')
  ax = fig.add_subplot()
  ax.set(title='Detecting mislabeled examples: AUROC by epoch', xlabel='epoch', ylabel='AUROC')
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if np.isnan(loss_auroc_T).all():
    ax.text(
      0.5,
      0.5,
      'AUROC undefined: needs both clean and mislabeled examples',
      ha='center',
      va='center',
      transform=ax.transAxes,
    )
    ax.set(xlim=(0.5, epochs_T[-1] + 0.5), ylim=(0, 1))
    return png(fig)
  marker = 'o' if epochs_T.size <= 30 else None
  ax.plot(
    epochs_T,
    loss_auroc_T,
    marker=marker,
    color='tab:red',
    label=f'loss at epoch (last {loss_auroc_T[-1]:.3f})',
  )
  ax.plot(
    epochs_T,
    aul_auroc_T,
    marker=marker,
    color='tab:green',
    label=f'AUL up to epoch (last {aul_auroc_T[-1]:.3f})',
  )
  ax.axhline(0.5, color='0.6', ls=':', lw=1, label='chance')
  low = min(0.45, float(np.nanmin([loss_auroc_T, aul_auroc_T])) - 0.03)
  ax.set(xlim=(0.5, epochs_T[-1] + 0.5), ylim=(low, 1.01))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=9, loc='best')
  return png(fig)


# ----------------------------------------------------------- Fig. 1: top-AUL images


def _display_image(image: np.ndarray) -> np.ndarray:
  """An (H, W) or (H, W, C) image min-max rescaled to [0, 1] for imshow: RGB for C = 3,
  else the mean over channels in grey (C = 2, 4 or more channels are not colours)."""
  image = np.asarray(image, np.float64)
  if image.ndim == 3 and image.shape[-1] != 3:
    image = image.mean(axis=-1)
  lo, hi = image.min(), image.max()
  return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def _rgb(image: np.ndarray) -> np.ndarray:
  """A display image as (H, W, 3) RGB: grey images repeated over the three channels."""
  return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)


def _label_name(label: Any, class_names: Sequence[str] | None) -> str:
  """The class name of an integer label, or the label itself without names."""
  return str(class_names[int(label)]) if class_names is not None else str(int(label))


def _check_images(images, labels_N, aul_N, true_labels_N, count) -> None:
  """Raises ValueError unless images are (N, H, W[, 1|3]) with N labels (true too) and AULs."""
  if images.ndim not in (3, 4):
    raise ValueError(f'images must be (N, H, W) or (N, H, W, C); got {images.shape}')
  n = images.shape[0]
  if labels_N.shape != (n,) or aul_N.shape != (n,):
    raise ValueError(
      f'labels_N and aul_N must have shape ({n},); got {labels_N.shape} and {aul_N.shape}'
    )
  if true_labels_N is not None and true_labels_N.shape != (n,):
    raise ValueError(f'true_labels_N must have shape ({n},); got {true_labels_N.shape}')
  if not (checks.is_int(count) and count >= 1):
    raise ValueError(f'count must be an int >= 1; got {count!r}')


def top_aul_images(
  images_NxHxWxC: Any,
  labels_N: Any,
  aul_N: Any,
  *,
  count: int = 32,
  true_labels_N: Any = None,
  class_names: Sequence[str] | None = None,
) -> bytes:
  """Fig. 1: the highest-AUL training images with their given labels, to eyeball the noise.

  When the true labels are known, a red 'true: y' under an image marks a corrupted label.
  """
  images = np.asarray(images_NxHxWxC)
  labels_N = np.asarray(labels_N).reshape(-1)
  aul_N = np.asarray(aul_N, np.float64).reshape(-1)
  if true_labels_N is not None:
    true_labels_N = np.asarray(true_labels_N).reshape(-1)
  _check_images(images, labels_N, aul_N, true_labels_N, count)
  top = np.argsort(-aul_N, kind='stable')[: min(count, aul_N.size)]
  ncols = min(8, top.size)
  nrows = math.ceil(top.size / ncols)
  # One mosaic in one axes, with white gaps for the captions: 32 axes of their own took
  # most of this figure's rendering time.
  tiles = [_rgb(_display_image(images[i])) for i in top]
  # Small images are blown up by a whole factor first, so that the gaps are whole pixels.
  factor = math.ceil(64 / max(tiles[0].shape[:2]))
  tiles = [tile.repeat(factor, axis=0).repeat(factor, axis=1) for tile in tiles]
  h, w = tiles[0].shape[:2]
  pixels_per_inch = max(h, w) / 1.2  # The longer side of a tile is 1.2 inches.
  gap_x, gap_y = 0.15 * pixels_per_inch, 0.42 * pixels_per_inch
  cell_x, cell_y = w + gap_x, h + gap_y
  mosaic = np.ones((math.ceil(nrows * cell_y), math.ceil(ncols * cell_x), 3), np.float32)
  width, height = ncols * cell_x / pixels_per_inch, nrows * cell_y / pixels_per_inch
  fig = Figure(figsize=(width + 0.2, height + 0.35))
  ax = fig.add_axes((0.1 / (width + 0.2), 0.0, width / (width + 0.2), height / (height + 0.35)))
  ax.set_axis_off()
  caption = functools.partial(ax.text, ha='center', fontsize=8)
  for k, (i, tile) in enumerate(zip(top, tiles, strict=True)):
    row, col = divmod(k, ncols)
    x0, y0 = round(col * cell_x + gap_x / 2), round(row * cell_y + gap_y / 2)
    mosaic[y0 : y0 + h, x0 : x0 + w] = tile
    title = f'{_label_name(labels_N[i], class_names)} ({aul_N[i]:.3g})'
    caption(x0 + w / 2, y0 - 0.03 * pixels_per_inch, title, va='bottom')
    if true_labels_N is not None and int(true_labels_N[i]) != int(labels_N[i]):
      true = f'true: {_label_name(true_labels_N[i], class_names)}'
      caption(x0 + w / 2, y0 + h + 0.03 * pixels_per_inch, true, va='top', color='red')
  ax.imshow(mosaic, interpolation='nearest', extent=(0, mosaic.shape[1], mosaic.shape[0], 0))
  fig.suptitle('Highest-AUL training images: given label (AUL)', fontsize=10)
  return png(fig)


# ------------------------------------------------------------------------- all figures


def run_figures(
  *,
  aul_N: Any,
  mixture: Any,
  is_mislabeled_N: Any = None,
  history_NxT: Any = None,
  images_NxHxWxC: Any = None,
  labels_N: Any = None,
  true_labels_N: Any = None,
) -> dict[str, bytes]:
  """Every figure the given run outputs allow, as PNG bytes keyed by file name."""
  figures = {'aul_histogram.png': aul_histogram(aul_N, mixture, is_mislabeled_N)}
  if images_NxHxWxC is not None and labels_N is not None:
    figures['top_aul_images.png'] = top_aul_images(
      images_NxHxWxC, labels_N, aul_N, true_labels_N=true_labels_N
    )
  if history_NxT is not None and is_mislabeled_N is not None:
    figures['loss_aul_histograms.png'] = loss_and_aul_histograms(history_NxT, is_mislabeled_N)
    figures['auroc_per_epoch.png'] = auroc_per_epoch(history_NxT, is_mislabeled_N)
  return figures
