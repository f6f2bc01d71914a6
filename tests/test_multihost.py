"""Two processes on localhost (CPU collectives over gloo) against one process, same config."""

import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from aul_jax import distributed
from tests import xla_flags
from tests.test_pipeline import ROOT

# One round: the two-process run of the default's two rounds is docs/multihost.md's (test_docs).
# 8 epochs: a signal sent at epoch 2 lands mid-stage (a two-process epoch takes about 0.7 s).
ARGS = [
  '--config=configs/digits.py',
  '--config.aul.epochs=8',
  '--config.retrain.epochs=2',
  '--config.detector.rounds=1',
  '--config.checkpoint.every_epochs=0',
]
# The one-process run is shared by the module's tests: one pytest-xdist worker runs them.
pytestmark = pytest.mark.xdist_group('multihost')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(workdir, devices_per_process, extra=(), wait=True):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=xla_flags(devices=devices_per_process),
    # oneDNN splits a convolution's sums over the OpenMP threads a call gets, and how many
    # it gets depends on how many devices share the process's cores: one thread per call
    # gives both layouts the same order of sums, so that the test compares the collectives.
    OMP_NUM_THREADS='1',
  )
  command = [sys.executable, 'launch.py', f'--workdir={workdir}', *ARGS, *extra]
  process = subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  return process.communicate(timeout=600) + (process.returncode,) if wait else process


def _two_processes(workdir):
  port = _free_port()
  return [
    _launch(
      workdir,
      2,
      [
        f'--config.distributed.coordinator_address=localhost:{port}',
        '--config.distributed.num_processes=2',
        f'--config.distributed.process_id={i}',
      ],
      wait=False,
    )
    for i in range(2)
  ]


@pytest.fixture(scope='module')
def single(tmp_path_factory):
  """scores.csv of the same config in one process of 4 devices."""
  workdir = tmp_path_factory.mktemp('single')
  _, err, code = _launch(workdir, 4)
  assert code == 0, err[-3000:]
  return np.genfromtxt(workdir / 'scores.csv', delimiter=',', names=True)


def test_distribution_is_detected_from_the_environment():
  assert not distributed.wanted('', True, environ={})
  assert distributed.wanted('', True, environ={'SLURM_NTASKS': '4'})
  assert not distributed.wanted('', True, environ={'SLURM_NTASKS': '1'})
  assert distributed.wanted('', True, environ={'TPU_WORKER_HOSTNAMES': 'a,b'})
  assert not distributed.wanted('', False, environ={'SLURM_NTASKS': '4'})
  assert distributed.wanted('host:1234', False, environ={})


def test_sigterm_to_one_process_stops_both_and_the_rerun_matches_one_process(tmp_path, single):
  # Process 1, which logs nothing, is the one signalled. Each process checks only its own
  # signal, and before they exchanged them the signalled one waited forever in its save.
  processes = _two_processes(tmp_path / 'multi')
  primary_log = []
  for line in processes[0].stderr:
    primary_log.append(line)
    if 'aul epoch 2/8' in line:
      processes[1].send_signal(signal.SIGTERM)
      break
  out0, err0 = processes[0].communicate(timeout=600)
  out1, err1 = processes[1].communicate(timeout=600)
  err0 = ''.join(primary_log) + err0
  assert (processes[0].returncode, processes[1].returncode) == (75, 75), (err0[-3000:], err1)
  stopped = [re.search(r'stopped by a signal after aul epoch (\d+)', e) for e in (err0, err1)]
  assert all(stopped), (err0[-2000:], err1[-2000:])
  epoch = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == epoch and 2 <= epoch < 8
  assert not (tmp_path / 'multi/scores.csv').exists()
  # The rerun resumes after that epoch and ends as one uninterrupted process does: the same
  # scores as the one-process run (an uninterrupted two-process run: test_docs' multihost).
  resumed = _two_processes(tmp_path / 'multi')
  results = [p.communicate(timeout=600) + (p.returncode,) for p in resumed]
  for _, err, code in results:
    assert code == 0, err[-3000:]
  assert f'resuming the aul stage after epoch {epoch}' in results[0][1]
  # Only process 0 logs and writes.
  assert 'outputs in' in results[0][1] and 'outputs in' not in results[1][1]
  multi = np.genfromtxt(tmp_path / 'multi/scores.csv', delimiter=',', names=True)
  np.testing.assert_allclose(multi['aul'], single['aul'], rtol=1e-4)
  # The other dynamics travel the same gather and scatter. The margin is a difference of
  # logits, so it gets an absolute tolerance.
  np.testing.assert_allclose(multi['aum'], single['aum'], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(multi['confidence'], single['confidence'], atol=1e-4)
  agree = (multi['p_mislabeled'] > 0.5) == (single['p_mislabeled'] > 0.5)
  assert agree.mean() > 0.995
