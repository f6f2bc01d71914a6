"""The one exception type for bad user input (config, data file, CLI)."""


class UserInputError(ValueError):
  """Bad config, data file or CLI input; `launch.py` reports it without a traceback."""
