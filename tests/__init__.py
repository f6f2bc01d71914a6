"""The test suite. `xla_flags` is the one place that says how tests compile."""

# XLA:CPU compiles without LLVM's optimisation passes in tests: compiling, not running, is
# most of the suite's time, this cuts its CPU time by about a quarter, and the results are
# the same (the golden values and the byte-identical resume tests pass under it). Runs a
# user makes, and the benchmarks (whose speed is the point), compile as usual.
COMPILE_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: the compile flags, and `devices` fake CPU devices."""
  count = '' if devices is None else f' --xla_force_host_platform_device_count={devices}'
  return COMPILE_FLAGS + count
