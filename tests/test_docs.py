"""Every documented snippet marked `<!-- test: KIND [ARGS] -->` in docs/*.md runs as written.

Paths under /tmp/ are moved into the test's temporary directory, `.venv/bin/python` becomes
this interpreter, and ARGS (e.g. fewer epochs) are appended to each launch.py command so
the snippets run on tiny budgets. KIND says how to run the block that follows the marker.
"""

import os
import re
import socket
import subprocess
import sys

import pytest

from aul_jax import pipeline
from tests import COMPILE_FLAGS, xla_flags
from tests.test_pipeline import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
MARKER = re.compile(r'<!-- test: (\S+)(.*?) -->\n```(\w+)\n(.*?)```', re.S)


def _guides() -> dict[str, list[tuple[str, list[str], str]]]:
  """{guide: [(kind, args, code), ...]} in document order."""
  guides = {}
  for name in sorted(os.listdir(DOCS)):
    if name.endswith('.md'):
      with open(os.path.join(DOCS, name)) as f:
        snippets = [(k, a.split(), c) for k, a, _, c in MARKER.findall(f.read())]
      if snippets:
        guides[name[:-3]] = snippets
  return guides


def _localise(code: str, tmp_path) -> str:
  code = code.replace('/tmp/', f'{tmp_path}/').replace('.venv/bin/python', sys.executable)
  return code.replace('$HOME/tensorflow_datasets', f'{tmp_path}/tfds')


def _with_args(command: str, args: list[str]) -> str:
  """Appends `args` to every launch.py command (continuation lines joined first)."""
  lines = command.replace('\\\n', ' ').splitlines()
  return '\n'.join(
    line.rstrip().removesuffix('&').rstrip()
    + ' '
    + ' '.join(args)
    + (' &' if line.rstrip().endswith('&') else '')
    if 'launch.py' in line
    else line
    for line in lines
  )


def _run(command: list[str], **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = xla_flags()  # One device, as a user's machine has.
  result = subprocess.run(
    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs
  )
  assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
  return result


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


MOCK_TFDS = """
import runpy, sys
import tensorflow_datasets as tfds
sys.argv = ['launch.py'] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=64):
  runpy.run_path('launch.py', run_name='__main__')
"""


def _run_snippet(kind: str, args: list[str], code: str, tmp_path) -> None:
  code = _localise(code, tmp_path)
  if kind == 'run':
    _run(['bash', '-euo', 'pipefail', '-c', _with_args(code, args)])
  elif kind in ('python', 'python-torch'):
    _run([sys.executable, '-c', code])
  elif kind == 'python-after-quickstart':
    # The quickstart's outputs, made in this process: its command is the quickstart guide's
    # test, and a launch would start, import and compile all over again.
    config = load_config('digits')
    config.aul.epochs = 3
    pipeline.run(config, f'{tmp_path}/aul_quickstart', log=lambda _: None)
    _run([sys.executable, '-c', code])
  elif kind == 'mock_tfds':
    argv = _with_args(code, args).split('launch.py', 1)[1].split()
    _run([sys.executable, '-c', MOCK_TFDS, *argv])
    workdir = code.split('--workdir', 1)[1].split()[0]
    assert os.path.exists(f'{workdir}/summary.json')
  elif kind == 'multihost':
    code = re.sub(r'localhost:\d+', f'localhost:{_free_port()}', _with_args(code, args))
    # The snippet sets its own XLA_FLAGS: it compiles as the other test subprocesses do.
    code = code.replace('XLA_FLAGS=', f'XLA_FLAGS={COMPILE_FLAGS}\\ ')
    _run(['bash', '-euo', 'pipefail', '-c', code])
    assert os.path.exists(f'{tmp_path}/aul_two_hosts/summary.json')
  else:
    raise AssertionError(f'unknown snippet kind {kind!r}')


@pytest.mark.parametrize('guide', sorted(_guides()))
def test_guide_snippets_run_in_order(guide, tmp_path):
  for kind, args, code in _guides()[guide]:
    if kind != 'python-torch':  # Those need torch: the test below.
      _run_snippet(kind, args, code, tmp_path)


def test_pytorch_snippets_run(tmp_path):
  snippets = [s for guide in _guides().values() for s in guide if s[0] == 'python-torch']
  assert snippets
  pytest.importorskip('torch')
  for kind, args, code in snippets:
    _run_snippet(kind, args, code, tmp_path)


def test_every_guide_has_a_tested_snippet():
  guides = {'quickstart', 'own_data', 'tfds', 'multihost', 'outputs', 'figures', 'python_api'}
  assert guides <= set(_guides())
