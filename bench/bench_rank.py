"""Benchmark: feature-map rank (criteria.filter_properties(..., 'rank')) against its floor, the bare SVDs.

Measures, for ResNet-56 (CIFAR, 3 channels, random weights) on `--batches` x `--batch_size` random 32x32
images (default 6 x 128 = 768, the method's calibration set):
  rank:  seconds of `filter_properties(model, variables, images, 'rank')`, steady state (its jitted per-batch
         function compiled by a first call);
  floor: seconds of one bare batched `jnp.linalg.svd(compute_uv=False)` per map size over every conv
         output map of every image (all maps of one HxW stacked into one (maps, H, W) call), after compile;
and prints rank / floor (the goal: at most 1.5). Each time is the minimum over `--repeats` runs, the two
measured alternately.

Run:  .venv/bin/python bench/bench_rank.py [--batches 6 --batch_size 128 --repeats 3]
XLA_FLAGS: picpq_jax.xla_setup's CPU defaults unless XLA_FLAGS is set; the flags in effect are printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from picpq_jax import xla_setup  # noqa: E402  (sets XLA_FLAGS before JAX starts)

XLA_FLAGS = xla_setup.configure_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from picpq_jax import criteria, models  # noqa: E402
from picpq_jax.testing import random_variables  # noqa: E402


def best_time(fn, repeats):
  """Minimum wall seconds of `fn()` (which must block until its result is ready) over `repeats` runs."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def stacked_maps(model, variables, images):
  """Every conv output map of every image, grouped by size: (H, W) -> (maps, H, W) float32 device array."""
  names = [c.name for c in model.spec.convs]

  @jax.jit
  def conv_outputs(x):
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    return [jnp.transpose(state['intermediates'][n]['conv'][0], (0, 3, 1, 2)) for n in names]

  groups: dict[tuple[int, int], list[np.ndarray]] = {}
  for x in images:
    for maps in conv_outputs(x):
      groups.setdefault(maps.shape[-2:], []).append(np.asarray(maps).reshape(-1, *maps.shape[-2:]))
  return {hw: jnp.asarray(np.concatenate(parts)) for hw, parts in groups.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='resnet56')
  parser.add_argument('--batches', type=int, default=6)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  model = models.create_model(args.arch, 10, 32, 3)
  variables = random_variables(model.spec, spread=0.2)
  images = np.random.default_rng(1).standard_normal((args.batches, args.batch_size, 32, 32, 3), np.float32)

  start = time.perf_counter()
  fp = criteria.filter_properties(model, variables, images, 'rank')  # compiles the per-batch function
  first = time.perf_counter() - start

  groups = stacked_maps(model, variables, images)
  svd = jax.jit(lambda m: jnp.linalg.svd(m, compute_uv=False))
  for maps in groups.values():
    svd(maps).block_until_ready()  # compile

  def floor_by_size():
    out = {}
    for (h, w), maps in groups.items():
      start = time.perf_counter()
      svd(maps).block_until_ready()
      out[f'{h}x{w}'] = time.perf_counter() - start
    return out

  # Interleaved, minimum of each: the machine is shared, and a slow spell should not fall on one side only.
  rank_times, floor_times = [], []
  for _ in range(args.repeats):
    rank_times.append(best_time(lambda: criteria.filter_properties(model, variables, images, 'rank'), 1))
    floor_times.append(floor_by_size())
  rank_s = min(rank_times)
  per_size = min(floor_times, key=lambda t: sum(t.values()))
  floor_s = sum(per_size.values())

  num_maps = sum(m.shape[0] for m in groups.values())
  mean_rank = np.mean(np.concatenate(list(fp.values())))
  print(f'command:   {" ".join([os.path.basename(sys.executable)] + sys.argv)}')
  print(f'XLA_FLAGS: {XLA_FLAGS}')
  print(f'devices:   {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores')
  print(f'{args.arch}: {len(fp)} convs, {args.batches}x{args.batch_size} images, {num_maps} maps '
        f'({", ".join(f"{s}: {m.shape[0]}" for s, m in zip(per_size, groups.values()))}); mean rank {mean_rank:.2f}')
  print(f'rank (filter_properties): {rank_s:.2f} s   (first call, with compile: {first:.2f} s)')
  print(f'floor (bare batched svd): {floor_s:.2f} s   ({", ".join(f"{k}: {v:.2f} s" for k, v in per_size.items())})')
  print(f'ratio rank / floor:       {rank_s / floor_s:.2f}   (goal <= 1.5)')


if __name__ == '__main__':
  main()
