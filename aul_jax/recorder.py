"""Records training dynamics inside anyone's training loop, in O(N) memory.

  recorder = aul_jax.Recorder(num_examples, num_classes)
  for epoch in range(epochs):
    for ids, x, y in loader:
      logits = model(x)
      recorder.update(ids, y, logits=logits)
    recorder.end_epoch()
  issues = recorder.result()          # an aul_jax.LabelIssues

Each batch's per-example values are scattered by example id into one (N, Q) epoch buffer
with the training run's own scatter (`aul.scatter_losses`), and each epoch is folded into
the AUL and the other dynamics with the training run's own accumulators (`aul.add_epoch`),
so a recorded run gives the same statistics and verdicts as an aul_jax training run. The
state lives on JAX's default device; batches may be numpy, JAX or any DLPack/`__array__`
array (a PyTorch tensor included). Every example must be measured exactly once per epoch:
`end_epoch` refuses an epoch with an id never seen or seen twice, rather than summing it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from aul_jax import api, aul, dynamics, losses


def as_array(x, what: str) -> jax.Array:
  """A numpy, JAX, DLPack or `__array__` array (a torch tensor, detached) as a JAX array."""
  if isinstance(x, jax.Array):
    return x
  if hasattr(x, 'detach'):  # torch: a tensor that requires grad exports nothing.
    x = x.detach()
  if hasattr(x, '__dlpack__') and not isinstance(x, np.ndarray):
    try:
      return jax.dlpack.from_dlpack(x)
    except (TypeError, ValueError, RuntimeError, BufferError):
      if hasattr(x, 'cpu'):  # A device tensor JAX cannot import: through the host.
        x = x.cpu()
  try:
    return jnp.asarray(np.asarray(x))
  except (TypeError, ValueError) as e:
    raise TypeError(f'{what}: cannot read a {type(x).__name__} as an array ({e})') from None


def _host(x, what: str) -> np.ndarray:
  """A small array (ids, labels) on the host, where it is checked and indexes the labels."""
  return (
    np.asarray(x) if isinstance(x, np.ndarray | list | tuple) else np.asarray(as_array(x, what))
  )


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _add_batch(epoch_NxQ, seen_N, ids_B, labels_B, logits_BxK, loss_B):
  """Scatters one batch's values (`dynamics.PER_EXAMPLE`, or the loss alone) and counts."""
  if loss_B is None:
    loss_B = losses.cross_entropy(logits_BxK, labels_B)
  values = [loss_B.astype(jnp.float32)]
  if logits_BxK is not None:
    per_example = dynamics.per_example(logits_BxK, labels_B)
    values += [per_example[name].astype(jnp.float32) for name in dynamics.PER_EXAMPLE[1:]]
  mask_B = jnp.ones(ids_B.shape, bool)
  epoch_NxQ = aul.scatter_losses(epoch_NxQ, ids_B, jnp.stack(values, axis=-1), mask_B)
  return epoch_NxQ, seen_N.at[ids_B].add(1)


@functools.partial(jax.jit, donate_argnums=(0,))
def _fold_epoch(state, epoch_NxQ, epoch):
  return aul.add_epoch(state, epoch_NxQ, epoch)


class Recorder:
  """Per-example training dynamics of a loop: `update` per batch, `end_epoch`, `result`.

  With logits, every statistic of a training run (AUL, AUM, cartography, forgetting,
  suggested label); with losses alone, the AUL and the last epoch's loss. Given both, the
  losses are the AUL's (say, a loss with label smoothing) and the logits give the rest.
  """

  def __init__(self, num_examples: int, num_classes: int | None = None):
    if not (isinstance(num_examples, int | np.integer) and num_examples > 0):
      raise ValueError(f'num_examples={num_examples!r}; expected a positive integer')
    if num_classes is not None and not (
      isinstance(num_classes, int | np.integer) and num_classes >= 2
    ):
      raise ValueError(f'num_classes={num_classes!r}; expected an integer >= 2')
    self.num_examples = int(num_examples)
    self.num_classes = None if num_classes is None else int(num_classes)
    self.epochs = 0
    self._state = None  # Built by the first batch, once it says whether logits come.
    self._labels_N = np.full(self.num_examples, -1, np.int64)  # Host copy, for the result.
    self._last_loss_N = None
    self._start_epoch()

  def _start_epoch(self):
    self._epoch_NxQ = None
    self._seen_N = jnp.zeros(self.num_examples, jnp.int32)

  def update(self, ids, labels, logits=None, losses=None) -> None:
    """Records one batch: (B,) example ids in [0, N), (B,) labels, and (B, K) logits
    and/or (B,) per-example losses."""
    if logits is None and losses is None:
      raise ValueError('update needs logits=(B, K) or losses=(B,), or both')
    ids_B = _host(ids, 'ids').astype(np.int64).reshape(-1)
    labels_B = _host(labels, 'labels').reshape(-1)
    logits_BxK = None if logits is None else as_array(logits, 'logits')
    loss_B = None if losses is None else as_array(losses, 'losses').reshape(-1)
    self._check_batch(ids_B, labels_B, logits_BxK, loss_B)
    tracked = len(dynamics.PER_EXAMPLE) if logits_BxK is not None else 1
    if self._state is None:
      self._state = aul.init_aul_state(self.num_examples, 1, None, dynamics=tracked > 1)
    if aul.tracked(self._state) != tracked:
      raise ValueError(
        'every batch must give the same inputs: the first gave '
        f'{"logits" if aul.tracked(self._state) > 1 else "losses only"}, this one '
        f'{"logits" if tracked > 1 else "losses only"}'
      )
    if self._epoch_NxQ is None:
      self._epoch_NxQ = aul.init_epoch_values(self.num_examples, tracked)
    self._epoch_NxQ, self._seen_N = _add_batch(
      self._epoch_NxQ,
      self._seen_N,
      ids_B.astype(np.int32),
      labels_B.astype(np.int32),
      logits_BxK,
      loss_B,
    )
    self._labels_N[ids_B] = labels_B

  def _check_labels_fixed(self, ids, labels) -> None:
    known = self._labels_N[ids]
    changed = np.flatnonzero((known >= 0) & (known != labels))
    if len(changed):
      i = ids[changed[0]]
      raise ValueError(
        f'example {i} was recorded with label {known[changed[0]]} and now {labels[changed[0]]}; '
        'the given labels must stay the same across epochs'
      )

  def _check_batch(self, ids_B, labels_B, logits_BxK, loss_B) -> None:
    size = len(ids_B)
    if len(labels_B) != size:
      raise ValueError(f'{size} ids but {len(labels_B)} labels')
    if logits_BxK is not None:
      if logits_BxK.ndim != 2 or len(logits_BxK) != size:
        raise ValueError(f'logits of shape {logits_BxK.shape}; expected ({size}, K)')
      if self.num_classes is not None and logits_BxK.shape[1] != self.num_classes:
        raise ValueError(
          f'logits have {logits_BxK.shape[1]} classes; the Recorder has {self.num_classes}'
        )
    if loss_B is not None and len(loss_B) != size:
      raise ValueError(f'{size} ids but {len(loss_B)} losses')
    ids, labels = ids_B, labels_B  # On the host (`_host`).
    if size and (ids.min() < 0 or ids.max() >= self.num_examples):
      raise ValueError(f'ids must be in [0, {self.num_examples}); got {ids.min()}..{ids.max()}')
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'labels must be integers, got {labels.dtype}')
    classes = self.num_classes or (logits_BxK.shape[1] if logits_BxK is not None else None)
    if size and (labels.min() < 0 or (classes is not None and labels.max() >= classes)):
      raise ValueError(f'labels must be in [0, {classes}); got {labels.min()}..{labels.max()}')
    self._check_labels_fixed(ids, labels)

  def end_epoch(self) -> None:
    """Folds the epoch in; refuses it (and discards it) unless every id was seen once."""
    if self._epoch_NxQ is None:
      raise ValueError(f'epoch {self.epochs + 1}: no batch was recorded (call update first)')
    seen_N = np.asarray(self._seen_N)
    missing, repeated = np.flatnonzero(seen_N == 0), np.flatnonzero(seen_N > 1)
    if len(missing) or len(repeated):
      self._start_epoch()
      problems = []
      if len(missing):
        problems.append(f'{len(missing)} ids never seen (e.g. {_some(missing)})')
      if len(repeated):
        problems.append(f'{len(repeated)} ids seen more than once (e.g. {_some(repeated)})')
      raise ValueError(
        f'epoch {self.epochs + 1}: {"; ".join(problems)}; every example must be measured '
        'exactly once per epoch (keep the last partial batch: drop_last=False), so this '
        'epoch was discarded'
      )
    self._last_loss_N = jnp.array(self._epoch_NxQ[:, 0])  # A copy: the buffer is donated.
    self._state = _fold_epoch(self._state, self._epoch_NxQ, jnp.int32(0))
    self.epochs += 1
    self._start_epoch()

  def statistics(self) -> dict[str, np.ndarray]:
    """Every per-example statistic so far, as (N,) float64 numpy arrays."""
    if self.epochs == 0:
      raise ValueError('no epoch was recorded: call end_epoch after each epoch')
    stats = {k: np.asarray(v, np.float64) for k, v in aul.statistics(self._state).items()}
    stats.setdefault('last_loss', np.asarray(self._last_loss_N, np.float64))
    return stats

  def result(self, statistic: str | None = None, rule: str | None = None) -> 'api.LabelIssues':
    """The label issues of the epochs so far (`aul_jax.find_label_issues` on them)."""
    return api.find_label_issues(
      self._labels_N, statistics=self.statistics(), statistic=statistic, rule=rule
    )


def _some(ids_N, count: int = 5) -> str:
  shown = ', '.join(str(i) for i in ids_N[:count])
  return shown + (', ...' if len(ids_N) > count else '')
