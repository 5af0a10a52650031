"""XLA settings for the CPU backend, applied before JAX starts (entry points and tests import this first).

By default XLA (jaxlib 0.10.2) sends convolutions to YNNPACK, whose conv weight gradients are slow on the
machines measured; keeping YNNPACK for element-wise fusions only (FAST_CPU_FLAGS) makes a ResNet train step
faster there, so the setting depends on what the CPU is (`cpu_isa`, from /proc/cpuinfo's flags):

  AVX-512  FAST_CPU_FLAGS: 2.1x the default's ResNet-56 train step (dense, 887 against 1,901 ms; 2-core
           Intel Xeon, 2026-12-02, bench/bench_train_step.py). Adding +reduce or +dot to the YNNPACK fusion
           types, or --xla_cpu_prefer_vector_width=512, moved it by under 3 % (noise); without YNNPACK's
           element-wise fusions (-eltwise) it took 1.36 s.
  AVX2     FAST_CPU_FLAGS: about 2x on ResNet-20/56 (2-core AMD EPYC, bench/bench_train_step.py).
  other    XLA's default: not measured (an x86 CPU without AVX2, or another architecture). Emulating AVX
           with --xla_cpu_max_isa=AVX on the AMD machine does not tell: that flag limits only the code XLA
           generates, while the convolutions (Eigen, YNNPACK) pick their kernels from the CPU itself.

`--xla_cpu_use_onednn=true` with the oneDNN fusion types gave WRONG gradients: never enable it. The
settings are xla_cpu_* flags, which accelerator backends ignore; a user's own XLA_FLAGS always win.

`use_compile_cache` (any backend, any time before the compiles it should serve): XLA's persistent cache of
compiled programs, for jobs that compile the same programs again (compare.py's runs).

`keep_freed_memory` (run by configure_cpu): glibc keeps what the process frees for its next allocations, so
XLA's per-execution temporary buffers stop being mapped and faulted in afresh on every step;
`release_freed_memory` (run between the stages of a run) gives the pages of what was freed back.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform

FAST_CPU_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,+eltwise'
# The CPU kinds, widest vector instructions first (cpu_isa), and the XLA flags measured best on each.
FLAGS_BY_ISA = {'AVX512': FAST_CPU_FLAGS, 'AVX2': FAST_CPU_FLAGS, 'other': ''}


def cpu_isa(cpuinfo: str | None = None) -> str:
  """'AVX512' (avx512f), 'AVX2' (avx2 and fma) or 'other', from the text of /proc/cpuinfo (read when None;
  'other' where it cannot be read, e.g. not Linux)."""
  if cpuinfo is None:
    try:
      with open('/proc/cpuinfo') as f:
        cpuinfo = f.read()
    except OSError:
      return 'other'
  flags = set()
  for line in cpuinfo.splitlines():
    if line.startswith('flags'):  # the same on every core; x86 only (ARM lists 'Features')
      flags = set(line.split(':', 1)[1].split())
      break
  if 'avx512f' in flags:
    return 'AVX512'
  if {'avx2', 'fma'} <= flags:
    return 'AVX2'
  return 'other'


def cpu_flags(isa: str | None = None) -> str:
  """The XLA flags picked for a CPU kind (this machine's when None)."""
  return FLAGS_BY_ISA[isa or cpu_isa()]


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _glibc_function(name: str, argtypes: tuple):
  """glibc's function `name` in the C library this process runs on, or None where that is not glibc."""
  if platform.libc_ver()[0] != 'glibc':
    return None
  try:
    fn = getattr(ctypes.CDLL(None), name)
  except (OSError, AttributeError):
    return None
  fn.argtypes = argtypes
  return fn


def keep_freed_memory() -> bool:
  """Make glibc keep the memory this process frees for its next allocations; True where it was set.

  Why: XLA's CPU runtime allocates each execution's temporary buffer afresh from its worker threads (1.1 GB
  for a ResNet-56 train step at batch 128). glibc serves a thread's allocation that large with a mapping of
  its own and unmaps it when freed, so every step faults every page of it in again: 268k minor page faults
  per step, 0.6 s of the 3.3 s of a one-core sliced step on a 2-core AMD EPYC (bench/bench_train_step.py
  --memory). With one arena (threads allocate from the main heap, which may grow past any size), no mapped
  chunks and no trimming, the buffer freed by one step is the next step's, already in memory. The price:
  the process holds on to its peak heap until `release_freed_memory` runs, and buffers of different sizes
  fragment it (the README's demo peaked at 5.0-7.6 GB resident against 2.5 GB with glibc's default).

  Nothing is changed where the C library is not glibc, or where the user set glibc's MALLOC_ARENA_MAX (their
  setting wins). Must run before JAX starts its threads: a thread keeps the arena it first allocated from.
  """
  mallopt = _glibc_function('mallopt', (ctypes.c_int, ctypes.c_int))
  if 'MALLOC_ARENA_MAX' in os.environ or mallopt is None:
    return False
  # -1 as the trim threshold: never give the top of the heap back (man mallopt).
  return all([mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))])


def release_freed_memory() -> bool:
  """Give the pages of the heap's free memory back to the system (glibc's malloc_trim); True where it did.

  Why: with `keep_freed_memory` nothing freed is ever returned, so a process would hold the largest heap
  any earlier stage needed through every later one. Called between stages (pipeline.py), it costs
  one round of page faults per stage, not per step: the README's demo drops to 0.5 GB resident after its
  baseline (from 2.5 GB) and to 0.7 GB after its search. It does not lower the peak, which the fine-tuning
  stage reaches by itself (4.8 GB, against 2.3 GB with glibc's default; trimming after every epoch did not
  lower it either). Python's unreachable objects are collected first, so that buffers held only by them
  are freed before the trim.
  """
  gc.collect()
  malloc_trim = _glibc_function('malloc_trim', (ctypes.c_size_t,))
  return malloc_trim is not None and malloc_trim(0) == 1


def configure_cpu(device_count: int | None = None) -> str:
  """Keep freed memory (`keep_freed_memory`) and set XLA_FLAGS to this CPU's settings unless the user set
  XLA_FLAGS; returns the flags in effect.

  device_count: fake this many CPU devices (tests and scaling checks of the sharded code).
  Must run before the first JAX computation; later calls change nothing that JAX has already read.
  """
  keep_freed_memory()
  if 'XLA_FLAGS' in os.environ:
    return os.environ['XLA_FLAGS']
  flags = cpu_flags()
  if device_count:
    flags += f' --xla_force_host_platform_device_count={device_count}'
  os.environ['XLA_FLAGS'] = flags.strip()
  return os.environ['XLA_FLAGS']


def use_compile_cache(directory: str) -> None:
  """Keep XLA's compiled programs in `directory` and reuse them whenever the same program is compiled again.

  The runs of a comparison build their train and eval steps afresh but mostly compile the same programs
  (masks and bits are arguments, not constants), so from the second run on the compile is a file read.
  Programs that compile in under 0.1 s are not kept. A cache the user set (JAX_COMPILATION_CACHE_DIR)
  wins: JAX reads the setting once, at the first compile that looks for a cache.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
