"""Benchmark: export of a compressed model (slim, integer weights) and its load; file sizes.

Builds a model of the zoo with random weights and BatchNorm statistics (no training, no compile of
`model.init`: shapes from `jax.eval_shape`), random chain-respecting masks that keep about --keep of every
layer's channels, and the method's bits (`bits.assign_bits`, default B_max: e.g. ResNet-56 stem 32, stages
8/6/4). Then, for BatchNorm kept and folded, prints the time of `export.export_model` (first call: includes
compiling the weight quantizer; second call) and of `export.load_model`, and the size report: bytes of the
dense FP32 params, of the export file, of the ideal bits-based size, and the ratios. With --check it also
runs `export.logit_difference` on a random batch (compiles both networks: slow on CPU).

Run from the repository root:

    .venv/bin/python bench/bench_export.py [--arch resnet56] [--keep 0.6] [--check]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from picpq_jax import xla_setup  # noqa: E402  (before JAX starts)

xla_setup.configure_cpu()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from picpq_jax import bits as bits_lib  # noqa: E402
from picpq_jax import export, models, topology  # noqa: E402
from picpq_jax.testing import random_masks, random_variables  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='resnet56', choices=models.ARCHS)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--in-channels', type=int, default=3)
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--keep', type=float, default=0.6, help='fraction of channels kept per layer/chain')
  parser.add_argument('--check', action='store_true', help='also compare logits (compiles both networks)')
  args = parser.parse_args()

  spec = models.get_spec(args.arch, args.classes, args.image_size, args.in_channels)
  topo = topology.topology_from_spec(spec)
  variables = random_variables(spec)
  masks = random_masks(topo, np.random.default_rng(0), args.keep)
  bits = bits_lib.assign_bits(topo, variables['params'], masks)
  print(f'{args.arch}: {topo.num_layers} convs, bits {sorted(set(bits.values()))}, '
        f'keep ~{args.keep:.0%} of channels; {jax.devices()[0].platform}')
  with tempfile.TemporaryDirectory() as tmp:
    for fold in (False, True):
      path = os.path.join(tmp, f'model_fold{int(fold)}.npz')
      t0 = time.perf_counter()
      export.export_model(path, spec, variables, masks, bits, fold_bn=fold)
      t1 = time.perf_counter()
      report = export.export_model(path, spec, variables, masks, bits, fold_bn=fold)
      t2 = time.perf_counter()
      export.load_model(path)
      t3 = time.perf_counter()
      print(f'fold_bn={fold}: export {t1 - t0:.2f} s (first), {t2 - t1:.2f} s (again); load {t3 - t2:.2f} s')
      print(f'  dense FP32 params {report["dense_fp32_bytes"]:,} B | export file {report["export_bytes"]:,} B '
            f'({report["ratio"]:.1f}x) | ideal {report["ideal_bytes"]:,} B ({report["ideal_ratio"]:.1f}x) | '
            f'{report["conv_weights"]:,} conv weights, mean '
            f'{report["conv_weight_bits"] / report["conv_weights"]:.2f} bits')
      if args.check:
        x = np.random.default_rng(0).normal(size=(8, args.image_size, args.image_size, args.in_channels))
        diff = export.logit_difference(path, spec, variables, masks, bits, x.astype(np.float32))
        print(f'  max |logit difference| per image: {np.array2string(diff, precision=1)}')


if __name__ == '__main__':
  main()
