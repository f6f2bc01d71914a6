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
