"""Benchmark: global pruning of a whole population of PIC candidates at once.

Measures `pruning.prune_masks_batched` (the jitted, vmapped core of `global_prune`) on CIFAR ResNet-56
(55 prunable convs, 1,072 ranking items) for a population of 64 random (a, b) candidates sharing one set
of integer filter properties, at the original's setting (keep 45% of FLOPs, safeguard 0.1), with
check_every 1 and 10. Prints the compile time (first call) and the steady-state time per call and per
candidate (median of --repeats calls, after the compile).

Run from the repository root (the project's XLA CPU settings apply unless XLA_FLAGS is set):

    .venv/bin/python bench/bench_prune.py [--population 64] [--repeats 20] [--arch resnet56]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from picpq_jax import xla_setup  # noqa: E402  (before JAX starts)

xla_setup.configure_cpu()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from picpq_jax import pruning  # noqa: E402
from picpq_jax.topology import get_topology  # noqa: E402


def population(topology, size: int, seed: int = 0):
  """fp (L, C) integer ranks and (a, b) (size, L) drawn as the aging evolution's initial population."""
  rng = np.random.default_rng(seed)
  fp = [rng.integers(0, 33, l.out_channels).astype(np.float32) for l in topology.layers]
  std = np.array([np.std(f) for f in fp], np.float32)
  a = np.exp(rng.standard_normal((size, topology.num_layers))).astype(np.float32)
  b = (rng.standard_normal((size, topology.num_layers)) * std).astype(np.float32)
  a[0], b[0] = 1.0, 0.0  # the identity candidate
  return pruning.pad_filter_properties(topology, fp), a, b


def timed(fn, repeats: int) -> tuple[float, float]:
  """(seconds of the first call, median seconds of `repeats` later calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='resnet56')
  parser.add_argument('--population', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--keep_fraction', type=float, default=0.45)
  args = parser.parse_args()

  topology = get_topology(args.arch, 10, 32, 3)
  fp, a, b = population(topology, args.population)
  print(f'{args.arch}: {topology.num_layers} layers, {pruning._items(topology).num_items} items; '
        f'population {args.population}; backend {jax.default_backend()} ({jax.devices()[0].device_kind})')
  for check_every in (1, 10):
    run = lambda: pruning.prune_masks_batched(topology, fp, a, b, args.keep_fraction, 0.1, check_every)
    first, steady = timed(run, args.repeats)
    _, info = run()
    # The settings are traced arrays: only the first call compiles.
    compiled = ' (compile + run)' if check_every == 1 else ''
    print(f'check_every={check_every:2d}: first call {first:.2f} s{compiled}; '
          f'steady {1e3 * steady:.1f} ms per call = {1e3 * steady / args.population:.3f} ms per candidate; '
          f'reached {int(np.sum(info["reached"]))}/{args.population}, '
          f'items removed {int(np.min(info["num_removed"]))}..{int(np.max(info["num_removed"]))}')


if __name__ == '__main__':
  main()
