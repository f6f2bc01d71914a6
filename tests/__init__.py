"""The test suite. `xla_flags` is the one place that says how tests and their subprocesses
compile."""

# Most tests spend their time compiling, not running: the short runs that tests start as
# subprocesses (launch.py, the docs' commands, the installed wheel, two-process runs) and the
# pytest processes themselves (conftest.py) compile without LLVM's optimisation passes. The
# golden values and the byte-identical resume tests pass under it (rounding differs: a
# mixture fit may take another number of EM steps, within the tests' tolerances). The
# execution-heavy tests (mixture fits, detection matrices) run slower: the detection
# benchmark's three --quick passes took 85 s longer, until they fitted each mixture from one
# start. The suite as a whole went from 16m27s to 14m25s on 2 cores (AMD EPYC, 2026-12-04),
# with the other cuts of that day, and to 10m14s-11m23s once the figures rendered faster.
# Runs a user makes, and the benchmarks (whose speed is the point), compile as usual; their
# --quick runs in tests check fields, not speed.
COMPILE_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test subprocess: the compile flags, and `devices` fake CPU devices."""
  count = '' if devices is None else f' --xla_force_host_platform_device_count={devices}'
  return COMPILE_FLAGS + count
