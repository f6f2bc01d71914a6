"""Progress: a bar on terminals, log lines elsewhere, TensorBoard summaries, on-device AUROC."""

import io
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from aul_jax import metrics, pipeline, progress
from tests.test_pipeline import load_config

METRICS = {'loss': 0.5, 'accuracy': 0.75, 'images_per_s': 1000.0, 'aul_auroc': 0.9}


def test_log_lines_when_not_on_a_terminal():
  lines = []
  with progress.Progress(lines.append, interactive=False, log_every_epochs=2) as p:
    p.start_stage('aul', 5, 0, 0)
    for epoch in range(5):
      p.epoch(epoch, 5, METRICS)
  assert [line.split(':')[0] for line in lines] == [
    'aul epoch 2/5',
    'aul epoch 4/5',
    'aul epoch 5/5',
  ]
  assert 'loss 0.5000, train accuracy 0.7500, AUL AUROC 0.9000, 1000 images/s' in lines[0]


def test_bar_on_a_terminal(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr('sys.stderr', stream)
  # A terminal wide enough for the whole bar: tqdm cuts it at the width it finds, which
  # differs between a terminal, CI and a pytest-xdist worker.
  monkeypatch.setenv('COLUMNS', '200')
  monkeypatch.setenv('LINES', '50')
  lines = []
  with progress.Progress(lines.append, interactive=True) as p:
    p.start_stage('retrain', 3, 1, 0)
    for epoch in range(1, 3):
      p.epoch(epoch, 3, METRICS)
  assert lines == []  # The bar replaces the per-epoch lines.
  assert 'retrain' in stream.getvalue() and '3/3' in stream.getvalue()
  assert 'train accuracy 0.7500' in stream.getvalue()


def _read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
  """Scalars of every TensorBoard event file in `directory` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as f:
      content = f.read()
    offset = 0
    while offset < len(content):
      (length,) = struct.unpack('<Q', content[offset : offset + 8])
      event = event_pb2.Event.FromString(content[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_run_writes_tensorboard_summaries(tmp_path):
  config = load_config('digits')
  config.aul.epochs = 3
  config.retrain.epochs = 2
  pipeline.run(config, str(tmp_path), log=lambda _: None)
  scalars = _read_scalars(tmp_path / 'tensorboard')
  assert {
    'aul/loss',
    'aul/accuracy',
    'aul/aul_auroc',
    'aul/test_error',
    'round2/loss',
    'round2/test_error',
    'retrain/loss',
    'retrain/test_error',
  } <= set(scalars)
  auroc = [value for _, value in scalars['aul/aul_auroc']]
  assert len(auroc) == 3 and all(0.5 < a <= 1 for a in auroc)
  # Steps continue over the stages: aul 1-3, the second detection round 4-6, retrain 7-8.
  assert [step for step, _ in scalars['round2/loss']] == [4, 5, 6]
  assert [step for step, _ in scalars['retrain/loss']] == [7, 8]


@pytest.mark.parametrize('seed', range(5))
def test_auroc_on_device_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  truth = rng.random(300) < 0.3
  score = np.round(rng.normal(size=300) + truth, 1)  # Rounded: many ties.
  expected = sk_metrics.roc_auc_score(truth, score)
  got = float(metrics.auroc_on_device(jnp.asarray(score), jnp.asarray(truth)))
  assert got == pytest.approx(expected, abs=1e-6)


def test_no_tensorboard_when_disabled(tmp_path):
  config = load_config('digits')
  config.aul.epochs = 1
  config.tensorboard = False
  pipeline.run(config, str(tmp_path), log=lambda _: None)
  assert not os.path.exists(tmp_path / 'tensorboard')
