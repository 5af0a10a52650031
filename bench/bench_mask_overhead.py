"""Where the masked train step's cost over the dense one comes from, and what folding the masks into
BatchNorm (fitness.MasksInBatchNorm) leaves of it.

Variants of one CIFAR ResNet train step (batch 128, SGD as the fitness's), and of its eval forward:
  dense    no masks.
  masked   the model's own masking: the BatchNorm output multiplied by the (C,) 0/1 mask (layers.py), and
           that product's gradient in the backward pass: a pass over each (B, H, W, C) output both ways.
  ones     masked with all-ones masks: the same program as 'masked' (the cost does not depend on the values).
  folded   the fitness's: the masks multiplied into BatchNorm's scale and bias, a (C,) product per conv.
BatchNorm statistics of zeroed channels cost the same in all variants (every channel is normalized in each;
the dense step does it too), so they are no part of the difference.

For each, the compiled program's counts of fusions (XLA loop fusions and YNNPACK element-wise fusions,
'kCustom') tell what extra passes it makes; the times are paired: round-robin over the variants, each round
one call of each in a rotated order, ratios to 'dense' per round, median over rounds. --cpu-time reports the
process's CPU seconds per step instead of wall seconds (steadier on a loaded machine; run pinned to one core
with `taskset -c 0`, where XLA then uses one thread).

  .venv/bin/python bench/bench_mask_overhead.py --arch resnet56
  taskset -c 0 .venv/bin/python bench/bench_mask_overhead.py --arch resnet20 --cpu-time --rounds 5
"""
import argparse
import collections
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def fusion_counts(hlo_text: str) -> dict:
  kinds = collections.Counter(re.findall(r'kind=(k\w+)', hlo_text))
  return {'loop fusions': kinds.get('kLoop', 0), 'YNNPACK fusions': kinds.get('kCustom', 0),
          'convolutions': len(re.findall(r'= \S+ convolution\(', hlo_text))}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='resnet56')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--keep', type=float, default=0.45)
  parser.add_argument('--cpu-time', action='store_true')
  args = parser.parse_args()
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  flags = xla_setup.configure_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bench_train_step import cpu_name  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from picpq_jax import fitness, models, pruning, topology, training  # pylint: disable=g-import-not-at-top

  cfg = common.base_config().search
  cfg.keep_fraction = args.keep
  spec = models.get_spec(args.arch, 10, 32, 3)
  model, topo = models.Net(spec), topology.topology_from_spec(spec)
  variables = jax.device_get(jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))())
  rng = np.random.default_rng(0)
  fp = pruning.pad_filter_properties(topo, [rng.integers(0, 32, l.out_channels) for l in topo.layers])
  fns = fitness.CandidateFns(model, topo, fp, cfg)
  masks, _ = jax.device_get(fns.prune(jnp.ones(topo.num_layers), jnp.zeros(topo.num_layers)))
  masks = {k: jnp.asarray(v) for k, v in masks.items()}
  ones = {k: jnp.ones_like(v) for k, v in masks.items()}
  batch = {'image': jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
  variants = {'dense': (model, None), 'masked': (model, masks), 'ones': (model, ones),
              'folded': (fitness.MasksInBatchNorm(model), masks)}
  clock = time.process_time if args.cpu_time else time.perf_counter
  print(f'CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} core(s) usable; load average at start '
        f'{os.getloadavg()[0]:.1f}; XLA_FLAGS={flags!r}')
  print(f'{args.arch}, batch {args.batch}, plan keeping {args.keep:.0%} of the FLOPs; '
        f'{"CPU" if args.cpu_time else "wall"} seconds')

  programs = {}
  for kind in ('train step', 'eval forward'):
    for name, (m, mk) in variants.items():
      if kind == 'train step':
        fn = jax.jit(training.make_train_step(m, fns.tx))
        arg = fns.start(variables)
      else:
        fn = jax.jit(training.make_eval_step(m))
        arg = variables
      compiled = fn.lower(arg, batch, mk).compile()
      programs[(kind, name)] = (compiled, arg, mk)
      print(f'  {kind:<12} {name:<7} {fusion_counts(compiled.as_text())}', flush=True)

  rounds = []
  keys = list(programs)
  for r in range(args.rounds):
    row = {}
    for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # each round in another order
      compiled, arg, mk = programs[key]
      t0 = clock()
      jax.block_until_ready(compiled(arg, batch, mk))  # the state is not donated: the same input each time
      row[key] = clock() - t0
    rounds.append(row)
  print(f'\nmedian over {args.rounds} rounds of one call each (rotated order); ratio to dense, paired per round:')
  for kind in ('train step', 'eval forward'):
    for name in variants:
      s = np.median([r[(kind, name)] for r in rounds])
      ratio = np.median([r[(kind, name)] / r[(kind, 'dense')] for r in rounds])
      print(f'  {kind:<12} {name:<7} {s * 1e3:8.0f} ms   {ratio:6.3f}')
  print('reproduce: ' + ' '.join(['.venv/bin/python', 'bench/bench_mask_overhead.py'] + sys.argv[1:]))


if __name__ == '__main__':
  main()
