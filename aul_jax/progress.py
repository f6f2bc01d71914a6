"""Training progress: a bar on a terminal, periodic log lines elsewhere, and TensorBoard.

Only the primary process reports. TensorBoard event files go to WORKDIR/tensorboard.
"""

import os
import sys
from collections.abc import Callable

import tqdm

Log = Callable[[str], None]


def _format(metrics: dict[str, float]) -> str:
  parts = [f'loss {metrics["loss"]:.4f}', f'train accuracy {metrics["accuracy"]:.4f}']
  if 'aul_auroc' in metrics:
    parts.append(f'AUL AUROC {metrics["aul_auroc"]:.4f}')
  parts.append(f'{metrics["images_per_s"]:.0f} images/s')
  return ', '.join(parts)


class Progress:
  """Receives per-epoch metrics of each training stage and shows and records them."""

  def __init__(
    self,
    log: Log,
    *,
    workdir: str | None = None,
    interactive: bool | None = None,
    log_every_epochs: int = 1,
  ):
    self._log = log
    self._interactive = sys.stderr.isatty() if interactive is None else interactive
    self._log_every = max(1, log_every_epochs)
    self._writer = None
    if workdir is not None:
      from tensorboardX import SummaryWriter  # Imported only when a run records summaries.

      self._writer = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=30)
    self._bar = None
    self._stage = ''
    self._step_offset = 0

  def log(self, message: str) -> None:
    """A one-off message (resuming, retraining), printed above the bar if there is one."""
    if self._bar is not None:
      self._bar.write(message, file=sys.stderr)
    self._log(message)

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def start_stage(self, stage: str, num_epochs: int, start_epoch: int, step_offset: int) -> None:
    """A training stage ('aul', 'retrain') begins; TensorBoard steps continue across stages."""
    self._stage, self._step_offset = stage, step_offset
    if self._interactive:
      self._bar = tqdm.tqdm(
        total=num_epochs, initial=start_epoch, desc=stage, unit='epoch', file=sys.stderr
      )

  def epoch(self, epoch: int, num_epochs: int, metrics: dict[str, float]) -> None:
    """Epoch `epoch` (0-based) of the current stage finished with `metrics`."""
    if self._bar is not None:
      self._bar.set_postfix_str(_format(metrics), refresh=False)
      self._bar.update(1)
    elif (epoch + 1) % self._log_every == 0 or epoch + 1 == num_epochs:
      self._log(f'{self._stage} epoch {epoch + 1}/{num_epochs}: {_format(metrics)}')
    for name, value in metrics.items():
      self.scalar(f'{self._stage}/{name}', value, self._step_offset + epoch + 1)

  def end_stage(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def scalar(self, name: str, value: float | None, step: int) -> None:
    if self._writer is not None and value is not None:
      self._writer.add_scalar(name, value, step)

  def close(self) -> None:
    self.end_stage()
    if self._writer is not None:
      self._writer.close()


def plain(log: Log) -> Progress:
  """Log lines for every epoch, no bar, no TensorBoard: for tests and library use."""
  return Progress(log, interactive=False)
