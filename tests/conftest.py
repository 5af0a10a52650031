"""Test setup: fake CPU devices for the sharding tests, the fast XLA CPU settings and kept freed memory, one
compilation cache for the whole run, and quiet TF."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Must be set before JAX initializes its backend; 4 fake devices serve the data-parallel tests and cost
# nothing to tests that use one. As in every entry point, freed memory is kept whatever XLA_FLAGS a run has
# (a user's XLA_FLAGS are left as they are).
from picpq_jax import xla_setup  # noqa: E402
xla_setup.configure_cpu(device_count=4)

# The tests compile the same tiny-model steps many times (each training builds its steps afresh): one XLA
# compilation cache for the run, inherited by the pytest-xdist workers and by the entry points the tests start
# as subprocesses, makes every compile after the first a file read. Removed by the process that made it.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='picpq_jax_test_xla_cache_')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
