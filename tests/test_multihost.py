"""Two processes on localhost (CPU collectives over gloo) against one process, same config."""

import os
import socket
import subprocess
import sys

import numpy as np

from aul_jax import distributed
from tests import xla_flags
from tests.test_pipeline import ROOT

# One round: the two-process run of the default's two rounds is docs/multihost.md's (test_docs).
ARGS = [
  '--config=configs/digits.py',
  '--config.aul.epochs=3',
  '--config.retrain.epochs=2',
  '--config.detector.rounds=1',
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(workdir, devices_per_process, extra=(), wait=True):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=xla_flags(devices=devices_per_process),
  )
  command = [sys.executable, 'launch.py', f'--workdir={workdir}', *ARGS, *extra]
  process = subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  return process.communicate(timeout=600) + (process.returncode,) if wait else process


def test_two_processes_match_one_process(tmp_path):
  _, err, code = _launch(tmp_path / 'single', 4)
  assert code == 0, err[-3000:]
  port = _free_port()
  processes = [
    _launch(
      tmp_path / 'multi',
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
  results = [p.communicate(timeout=600) + (p.returncode,) for p in processes]
  for _, err, code in results:
    assert code == 0, err[-3000:]
  # Only process 0 logs and writes.
  assert 'outputs in' in results[0][1] and 'outputs in' not in results[1][1]
  single = np.genfromtxt(tmp_path / 'single/scores.csv', delimiter=',', names=True)
  multi = np.genfromtxt(tmp_path / 'multi/scores.csv', delimiter=',', names=True)
  np.testing.assert_allclose(multi['aul'], single['aul'], rtol=1e-4)
  # The other dynamics travel the same gather and scatter. The margin is a difference of
  # logits, so it gets an absolute tolerance.
  np.testing.assert_allclose(multi['aum'], single['aum'], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(multi['confidence'], single['confidence'], atol=1e-4)
  agree = (multi['p_mislabeled'] > 0.5) == (single['p_mislabeled'] > 0.5)
  assert agree.mean() > 0.995


def test_distribution_is_detected_from_the_environment():
  assert not distributed.wanted('', True, environ={})
  assert distributed.wanted('', True, environ={'SLURM_NTASKS': '4'})
  assert not distributed.wanted('', True, environ={'SLURM_NTASKS': '1'})
  assert distributed.wanted('', True, environ={'TPU_WORKER_HOSTNAMES': 'a,b'})
  assert not distributed.wanted('', False, environ={'SLURM_NTASKS': '4'})
  assert distributed.wanted('host:1234', False, environ={})
