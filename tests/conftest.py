"""Test setup: four fake CPU devices, so data-parallel code is exercised on any machine, and
one persistent compilation cache per test session.

Every pipeline run builds fresh jitted closures, so identical programs (the same model, recipe
and shapes) were compiled again in each test and in each subprocess a test starts. The cache
lives in a temporary directory for this session only (subprocesses inherit it through the
environment) and is removed at exit; a compiled program gives the same results whether it
came from the cache or not.
"""

import atexit
import os
import shutil
import tempfile

from tests import xla_flags

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', xla_flags(devices=4))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='aul_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
