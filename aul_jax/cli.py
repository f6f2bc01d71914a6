"""Command-line parsing for launch.py and `python -m aul_jax.score`: each mistake on the
command line (unknown flag or config field, value of the wrong type, a config file that does
not load) is one `error:` line naming the flag and the fix, with exit code 2.

absl's own parser prints a FATAL line and exits 1, and a misspelled `--config.a.b=...`
override escapes it as a chained traceback; `parse_flags` is passed to `app.run` instead.
"""

import os
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from aul_jax import config as config_lib

USAGE_ERROR = 2  # The exit code of every user error, as for UserInputError.


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """`flag_values(argv)`, or one `error:` line on stderr and exit code 2. A --config that
  is no file but names a shipped config (`digits`, `npz.py`) reads that config."""
  argv = shipped_config(argv)
  try:
    remaining = flag_values(argv)
  except Exception as error:  # noqa: BLE001 - absl, ml_collections and the config file raise many.
    _exit(describe(error, argv))
  if 'config' in flag_values and flag_values['config'].present:
    config = flag_values['config'].value
    if not isinstance(config, ml_collections.ConfigDict):  # A file that failed to load.
      try:
        config.keys()  # config_flags stands in an object that raises the loading error.
        error = TypeError(type(config).__name__)
      except Exception as e:  # noqa: BLE001
        error = e
      _exit(_config_file_problem(_config_arg(argv), error))
  return remaining


def configs_dir() -> str:
  """The shipped configs: aul_jax/configs in an installed package, else the repo's configs/."""
  package = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(package, 'configs')
  return (
    installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), 'configs')
  )


def shipped_config(argv: list[str]) -> list[str]:
  """`argv` with a --config that names no file but a shipped config's name made its path."""
  value = _config_arg(argv)
  if value is None or os.path.exists(value):
    return argv
  name = os.path.basename(value).removesuffix('.py')
  path = os.path.join(configs_dir(), f'{name}.py')
  if not os.path.isfile(path):
    return argv
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg == f'--config={value}':
      argv[i] = f'--config={path}'
    elif arg == '--config' and i + 1 < len(argv) and argv[i + 1] == value:
      argv[i + 1] = path
  return argv


def _exit(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def describe(error: Exception, argv: list[str]) -> str:
  """One line saying which flag is wrong and how to fix it."""
  message = str(error).strip('\'"')
  config_arg = _config_arg(argv)
  if config_arg is not None and not isinstance(_load(config_arg), ml_collections.ConfigDict):
    return _config_file_problem(config_arg, error)
  if isinstance(error, flags.IllegalFlagValueError):
    return _bad_value(message, config_arg)
  if isinstance(error, flags.UnrecognizedFlagError):
    name = getattr(error, 'flagname', None) or message
    return f'unknown flag --{name}; see --helpfull for the flags there are'
  if isinstance(error, (AttributeError, KeyError)) and config_arg is not None:
    unknown = _unknown_override(argv, config_arg)
    if unknown:
      return unknown
  if isinstance(error, flags.Error):
    return f'{message}; see --helpfull'
  return f'the command line could not be parsed: {type(error).__name__}: {message}'


def _config_arg(argv: list[str]) -> str | None:
  """The value of --config (the config file), if given."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


_LOADED: dict = {}


def _load(path: str):
  """What `path`'s get_config() returns, without overrides (None if it does not load)."""
  if path not in _LOADED:
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', flag_values=values)
    argv, sys.argv = sys.argv, ['prog', f'--config={path}']  # Overrides are read from sys.argv.
    try:
      values(sys.argv)
      config = values['config'].value
    except Exception:  # noqa: BLE001 - reported by the caller as the file's problem.
      config = None
    finally:
      sys.argv = argv
    _LOADED[path] = config
  return _LOADED[path]


def _config_file_problem(path: str, error: Exception) -> str:
  text = str(error)
  if os.path.isdir(path):
    return f'config file {path} is a directory; give a file such as configs/digits.py'
  if 'No such file or directory' in text or 'Errno 2' in text:
    shipped = sorted(n[:-3] for n in os.listdir(configs_dir()) if n.endswith('.py'))
    return (
      f'config file {path} does not exist; give a path, or a shipped config: {", ".join(shipped)}'
    )
  if isinstance(error, SyntaxError):
    return f'config file {path} has a syntax error at line {error.lineno}: {error.msg}'
  if "has no attribute 'get_config'" in text:
    return f'config file {path} defines no get_config(); it must return a ConfigDict'
  config = _load(path)
  if config is not None and not isinstance(config, ml_collections.ConfigDict):
    return (
      f'config file {path}: get_config() returned {type(config).__name__}; '
      'expected an ml_collections.ConfigDict'
    )
  last = text.strip().splitlines()[-1].strip() if text.strip() else type(error).__name__
  return f'config file {path} could not be loaded: {last}'


def _bad_value(message: str, config_arg: str | None) -> str:
  """'flag --config.aul.epochs=abc: invalid literal ...' as the field and its type."""
  match = re.match(r'flag --(config\.)?([\w.]+)=(.*?): (.*)', message, re.S)
  if not match:
    return f'{message}; see --helpfull'
  in_config, name, value, reason = match.groups()
  if in_config and config_arg is not None:
    config = _load(config_arg)
    current = _get(config, name.split('.')) if config is not None else None
    if isinstance(current, ml_collections.ConfigDict):
      return f'--config.{name}={value}: {name} is a section; set one of its fields, e.g. ' + (
        f'--config.{name}.{sorted(current.keys())[0]}=...'
      )
    if current is not None:
      return (
        f'--config.{name}={value}: expected {_type_name(current)} '
        f'({name} is {current!r} in {config_arg})'
      )
  if 'must have a value other than None' in reason:
    return f'--{name} is required; see --helpfull'
  return f'--{"config." if in_config else ""}{name}={value}: {reason.splitlines()[0]}'


def _unknown_override(argv: list[str], config_arg: str) -> str | None:
  """For the first --config.a.b=... naming no field: the nearest names and the fields there."""
  config = _load(config_arg)
  if config is None:
    return None
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.') :].split('=', 1)[0].split('.')
    node = config
    for depth, part in enumerate(path):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      fields = node if isinstance(node, ml_collections.ConfigDict) else {}
      prefix = ''.join(f'{p}.' for p in path[:depth])
      hint = config_lib.nearest_fields(part, fields, prefix)
      return f'--config.{".".join(path)}: no such config field; {hint}'
  return None


def _get(config, path: list[str]):
  node = config
  for part in path:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def _type_name(value) -> str:
  if isinstance(value, bool):
    return 'true or false'
  if isinstance(value, int):
    return 'an integer'
  if isinstance(value, float):
    return 'a number'
  if isinstance(value, str):
    return 'a string'
  if isinstance(value, tuple):
    return 'a tuple, e.g. "(0.5, 0.75)"'
  return type(value).__name__
