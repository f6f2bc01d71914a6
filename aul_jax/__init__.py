"""aul_jax: find mislabeled training data from training dynamics (the AUL paper), in JAX.

Shape letters, used as name suffixes everywhere (`aul_N`, `resp_NxM`, `logits_BxK`):
  N  training examples          B  examples in a global batch   b  on one device
  T  epochs                     S  steps of an epoch
  K  classes                    M  mixture components           D  features fit jointly
  R  trials (networks trained side by side)                     Q  values a step reports
  H, W, C  image height, width, channels (also a kernel's HWIO: H x W x C x O)
  G  points of a plotted grid   I  restarts of a mixture fit    E  an even subsample of N
Host arrays of per-epoch values are (N, T), one row per example; the logits a user saves
epoch by epoch are (T, N, K).
"""

__version__ = '0.2.0'

# The Python API, loaded on first use so that `import aul_jax.gmm` (or a config file) does
# not load the training stack: aul_jax.find_label_issues, aul_jax.Recorder.
_API = {
  'find_label_issues': 'aul_jax.api',
  'LabelIssues': 'aul_jax.api',
  'Recorder': 'aul_jax.recorder',
}
__all__ = ['__version__', *_API]


def __getattr__(name):
  if name in _API:
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
