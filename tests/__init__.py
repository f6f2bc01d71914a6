"""The test suite. `xla_flags` is the one place that says how test subprocesses compile."""

# The short runs that tests start as subprocesses (launch.py, the docs' commands, the
# installed wheel, two-process runs) spend most of their time compiling, so they compile
# without LLVM's optimisation passes. The same results either way: the golden values and the
# byte-identical resume tests pass under it. The pytest processes themselves keep XLA's
# default: their execution-heavy tests (mixture fits, detection matrices) ran slower without
# it, and the whole suite took 13m50s that way against 13m10s (2 cores). Runs a user makes,
# and the benchmarks (whose speed is the point), compile as usual; their --quick runs in
# tests check fields, not speed, so they compile like the other test subprocesses.
COMPILE_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test subprocess: the compile flags, and `devices` fake CPU devices."""
  count = '' if devices is None else f' --xla_force_host_platform_device_count={devices}'
  return COMPILE_FLAGS + count
