"""Runs the AUL pipeline: `python launch.py --config configs/digits.py --workdir DIR` in the
repo, or `aul-jax --config digits --workdir DIR` once the package is installed (a shipped
config may be named by its file name alone).

Any config field can be overridden, e.g. `--config.noise.rate=0.2 --config.model.name=lenet`.
"""

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from aul_jax import cli, distributed, pipeline
from aul_jax import config as config_lib
from aul_jax.errors import DivergedError, Preempted, UserInputError


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--config (a config file, with --config.a.b=... overrides), --workdir and --force."""
  config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file.', lock_config=True, flag_values=flag_values
  )
  flags.DEFINE_string(
    'workdir', None, 'Directory for scores.csv and summary.json.', flag_values=flag_values
  )
  flags.DEFINE_bool(
    'force',
    False,
    'Continue a run whose workdir was made with a different config.',
    flag_values=flag_values,
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def _log(message: str) -> None:
  """Progress lines for people, on stderr; library chatter stays at absl's --verbosity."""
  print(f'{time.strftime("%H:%M:%S")} {message}', file=sys.stderr, flush=True)


def run(config, workdir: str, force: bool = False, where: str = 'the config') -> int:
  """Runs the pipeline and returns the exit code: 0 done, 2 a user error (one `error:` line on
  stderr), 3 diverged, 75 preempted (rerun to resume)."""
  try:
    config_lib.check_fields(config, where)
    config_lib.validate_distributed(config.distributed)
    distributed.initialize(**config.distributed)
    log = _log if distributed.is_primary() else lambda _: None
    pipeline.run(config, workdir, log=log, force=force)
  except UserInputError as e:
    print(f'error: {e}', file=sys.stderr)
    return cli.USAGE_ERROR
  except DivergedError as e:
    print(f'error: training diverged: {e}; the last good checkpoint is kept', file=sys.stderr)
    return 3
  except Preempted as e:
    print(f'{e}', file=sys.stderr)
    return 75  # EX_TEMPFAIL: try again later.
  return 0


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Keep orbax's and JAX's INFO chatter out.
  values = flags.FLAGS
  where = f'config file {values["config"].config_filename}'
  return run(values.config, values.workdir, values.force, where)


def entry() -> None:
  """The `aul-jax` console script and launch.py."""
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  entry()
