"""Test setup: fake CPU devices for the sharding tests, the fast XLA CPU settings, and quiet TF."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Must be set before JAX initializes its backend; 4 fake devices serve the data-parallel tests and cost
# nothing to tests that use one.
if 'XLA_FLAGS' not in os.environ:
  from picpq_jax import xla_setup  # noqa: E402
  xla_setup.configure_cpu(device_count=4)
