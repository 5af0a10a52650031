"""Time of the OPQ-style allocation (picpq_jax/methods/opq.py, `allocate`) on ResNet-56 (CIFAR-10 shapes) and
ResNet-50 (ImageNet shapes), random He-normal weights (picpq_jax.testing.random_variables). Goal: under a
second each on a CPU. The allocation is numpy only: a Laplace fit per layer, two bisections, the masks and
channel scales.

  .venv/bin/python bench/bench_opq_allocate.py

Prints, per architecture: allocated convs, their weights, the best of 3 wall times (after one warm-up call),
and the resulting sparsity and average bits.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from picpq_jax import models, testing, topology  # noqa: E402
from picpq_jax.methods import opq  # noqa: E402

CASES = (('resnet56', 10, 32, 3), ('resnet50', 1000, 224, 3))
SPARSITY, AVG_BITS = 0.8, 4.0


def main():
  for arch, classes, size, channels in CASES:
    spec = models.get_spec(arch, classes, size, channels)
    topo = topology.get_topology(arch, classes, size, channels)
    params = testing.random_variables(spec)['params']
    opq.allocate(topo, params, SPARSITY, AVG_BITS)  # warm-up
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      a = opq.allocate(topo, params, SPARSITY, AVG_BITS)
      times.append(time.perf_counter() - t0)
    weights = sum(int(np.size(l.weight_mask)) for l in a.layers.values())
    print(f'{arch}: {len(a.layers)} convs, {weights:,} weights: allocation {min(times):.3f} s (best of 3); '
          f'sparsity {a.sparsity:.4f} (target {SPARSITY}), average bits {a.avg_bits:.3f} (target {AVG_BITS})')


if __name__ == '__main__':
  main()
