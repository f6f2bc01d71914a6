"""The exceptions that `launch.py` and `aul_jax.score` turn into one line and an exit code."""


class UserInputError(ValueError):
  """Bad config, data file or CLI input; reported without a traceback (exit 2)."""


class DivergedError(FloatingPointError):
  """The training loss became NaN or infinite (exit 3); the last good checkpoint is kept."""


class Preempted(Exception):
  """The run was asked to stop; a checkpoint was saved and rerunning resumes it (exit 75)."""
