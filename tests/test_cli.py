"""Command-line mistakes: one `error:` line naming the flag and the fix, exit code 2.

In-process, with a fresh FlagValues per case (a subprocess per case costs seconds).
"""

import sys

import pytest
from absl import flags
from ml_collections import config_flags

from aul_jax import cli
from aul_jax import config as config_lib
from aul_jax.errors import UserInputError

DIGITS = 'configs/digits.py'


def _error(monkeypatch, capsys, *args) -> str:
  """The one line printed for `prog *args`, which must exit with code 2."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True)
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  argv = ['prog', *args]
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads its overrides from sys.argv.
  monkeypatch.delitem(sys.modules, 'config_config', raising=False)  # Its cached config file.
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(argv, values)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  return lines[0]


@pytest.mark.parametrize(
  'args,expected',
  [
    (
      [f'--config={DIGITS}', '--config.aul.epoch=3'],
      ['--config.aul.epoch: no such config field; did you mean aul.epochs?', 'aul has: '],
    ),
    (
      [f'--config={DIGITS}', '--config.aull.epochs=3'],
      ['--config.aull.epochs: no such config field; did you mean aul?'],
    ),
    (
      [f'--config={DIGITS}', '--config.aul.epochs=abc'],
      ['--config.aul.epochs=abc: expected an integer', f'aul.epochs is 20 in {DIGITS}'],
    ),
    ([f'--config={DIGITS}', '--config.aul.epochs=2.5'], ['expected an integer']),
    ([f'--config={DIGITS}', '--config.aul.learning_rate=fast'], ['expected a number']),
    ([f'--config={DIGITS}', '--config.tensorboard=maybe'], ['expected true or false']),
    ([f'--config={DIGITS}', '--config.aul=3'], ['aul is a section; set one of its fields']),
    ([f'--config={DIGITS}', '--nope=3'], ['unknown flag --nope']),
    (['--config=nope.py'], ['config file nope.py does not exist']),
    (['--config=configs'], ['config file configs is a directory']),
  ],
)
def test_command_line_mistakes_are_one_line(monkeypatch, capsys, args, expected):
  message = _error(monkeypatch, capsys, *args)
  for part in expected:
    assert part in message


@pytest.mark.parametrize(
  'source,expected',
  [
    ('x = (\n', 'has a syntax error at line 1'),
    ('x = 1\n', 'defines no get_config()'),
    ('def get_config():\n  return 3\n', 'get_config() returned int'),
    ('import no_such_module\n', 'could not be loaded: '),
  ],
)
def test_config_files_that_do_not_load(monkeypatch, capsys, tmp_path, source, expected):
  path = tmp_path / 'my_config.py'
  path.write_text(source)
  message = _error(monkeypatch, capsys, f'--config={path}')
  assert f'config file {path}' in message and expected in message


def test_config_fields_are_those_of_the_base_config():
  config = config_lib.base_config()
  config_lib.check_fields(config)
  config.aul.epoch = 3  # A misspelling in a config file would otherwise be ignored.
  with pytest.raises(
    UserInputError, match=r'has the field aul\.epoch, .* did you mean aul\.epochs'
  ):
    config_lib.check_fields(config)
  del config.aul['epoch']
  del config.aul['warmup_epochs']
  with pytest.raises(UserInputError, match=r'lacks the field aul\.warmup_epochs'):
    config_lib.check_fields(config)
  with pytest.raises(UserInputError, match='is a dict; expected an ml_collections.ConfigDict'):
    config_lib.check_fields({})
