"""XLA settings for the CPU backend, applied before JAX starts (entry points and tests import this first).

Measured on the 2-core development machine with jaxlib 0.10.2 (bench/bench_train_step.py): by default XLA
sends convolutions to YNNPACK, whose conv weight gradients are slow there; keeping YNNPACK for element-wise
fusions only makes a ResNet-20 train step about 2x faster. `--xla_cpu_use_onednn=true` with the oneDNN
fusion types gave WRONG gradients: never enable it. The settings are xla_cpu_* flags, which accelerator
backends ignore; a user's own XLA_FLAGS always win.
"""
from __future__ import annotations

import os

FAST_CPU_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,+eltwise'


def configure_cpu(device_count: int | None = None) -> str:
  """Set XLA_FLAGS to the fast CPU settings unless the user set XLA_FLAGS; returns the flags in effect.

  device_count: fake this many CPU devices (tests and scaling checks of the sharded code).
  Must run before the first JAX computation; later calls change nothing that JAX has already read.
  """
  if 'XLA_FLAGS' in os.environ:
    return os.environ['XLA_FLAGS']
  flags = FAST_CPU_FLAGS
  if device_count:
    flags += f' --xla_force_host_platform_device_count={device_count}'
  os.environ['XLA_FLAGS'] = flags
  return flags
