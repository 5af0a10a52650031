"""Search fitness throughput: candidates per second against K and the evaluation mode, and peak memory
against the chunk size.

For each model and each mode ('host': Python loop over one compiled vmapped step; 'vmap': one compiled
program per group, lax.scan over the tau steps, candidates vmapped; 'map': the same program with the
candidates one after another), it times the evaluation of K candidates in one call (after a warm-up call
that compiles) and compares it with K sequential single-candidate calls of the same mode. Peak memory is
the process's maximum resident set (CPU) or the device's peak bytes in use (GPU/TPU), measured in a fresh
process per chunk size. Synthetic data of the right shapes; random weights (speed does not depend on them).

  .venv/bin/python bench/bench_fitness.py                     # demo model + ResNet-20/32x32x3, tau 4
  .venv/bin/python bench/bench_fitness.py --tau 200 --batch 128 --ks 1 4 16   # the original's tau and batch
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {'demo (resnet20, 32x32x1)': ('resnet20', 32, 1), 'resnet20 (32x32x3)': ('resnet20', 32, 3)}


def setup(arch, size, channels, tau, batch, chunk, mode):
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  xla_setup.configure_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from picpq_jax import fitness, models, pruning, topology  # pylint: disable=g-import-not-at-top
  config = common.base_config()
  config.search.tau, config.search.batch_size, config.search.keep_fraction = tau, batch, 0.5
  spec = models.get_spec(arch, 10, size, channels)
  model, topo = models.Net(spec), topology.topology_from_spec(spec)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(np.abs(rng.normal(0, 0.1, s.shape)), s.dtype), shapes)
  fp = pruning.pad_filter_properties(topo, [rng.integers(0, size, l.out_channels) for l in topo.layers])
  train = {'image': rng.normal(size=(tau, batch, size, size, channels)).astype(np.float32),
           'label': rng.integers(0, 10, (tau, batch)).astype(np.int32)}
  val = {'image': rng.normal(size=(1, 500, size, size, channels)).astype(np.float32),
         'label': rng.integers(0, 10, (1, 500)).astype(np.int32)}
  fns = fitness.CandidateFns(model, topo, fp, config.search)
  evaluate = fitness.PopulationFitness(fns, variables, train, val, chunk_size=chunk, mode=mode)
  a = np.exp(rng.normal(size=(64, topo.num_layers))).astype(np.float32)
  b = rng.normal(size=(64, topo.num_layers)).astype(np.float32)
  return evaluate, a, b, jax


def child(args):
  arch, size, channels = MODELS[args.model]
  evaluate, a, b, jax = setup(arch, size, channels, args.tau, args.batch, args.chunk, args.mode)
  k = args.k
  evaluate(a[:k], b[:k])  # compile
  t0 = time.perf_counter()
  evaluate(a[k:2 * k], b[k:2 * k])
  batched = time.perf_counter() - t0
  if args.memory_only:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get('peak_bytes_in_use') or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({'peak_bytes': peak}))
    return
  evaluate(a[:1], b[:1])
  t0 = time.perf_counter()
  for i in range(k):
    evaluate(a[i:i + 1], b[i:i + 1])
  sequential = time.perf_counter() - t0
  print(json.dumps({'batched_s': batched, 'sequential_s': sequential}))


def run_child(**kw):
  argv = [sys.executable, __file__, '--child']
  for key, value in kw.items():
    argv += [f'--{key.replace("_", "-")}'] + ([] if value is True else [str(value)])
  out = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  if out.returncode:
    raise RuntimeError(out.stderr[-2000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tau', type=int, default=4)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--ks', type=int, nargs='+', default=[1, 4])
  parser.add_argument('--modes', nargs='+', default=['host', 'vmap', 'map'])
  parser.add_argument('--chunks', type=int, nargs='+', default=[1, 2, 4])
  parser.add_argument('--models', nargs='+', default=list(MODELS))
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--model', help=argparse.SUPPRESS)
  parser.add_argument('--mode', help=argparse.SUPPRESS)
  parser.add_argument('--k', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--chunk', type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument('--memory-only', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args)
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  print(f'XLA_FLAGS: {os.environ.get("XLA_FLAGS") or xla_setup.FAST_CPU_FLAGS} | cores {os.cpu_count()} | '
        f'tau {args.tau}, batch {args.batch}, 500 validation images')
  print(f'{"model":<26} {"mode":<5} {"K":>3} {"cand/s":>8} {"sequential cand/s":>18} {"speed-up":>9}')
  for model in args.models:
    for mode in args.modes:
      for k in args.ks:
        chunk = k if mode == 'vmap' else 1
        r = run_child(model=model, mode=mode, k=k, chunk=chunk, tau=args.tau, batch=args.batch)
        print(f'{model:<26} {mode:<5} {k:>3} {k / r["batched_s"]:8.3f} {k / r["sequential_s"]:18.3f} '
              f'{r["sequential_s"] / r["batched_s"]:9.2f}', flush=True)
  print(f'\npeak memory against chunk size (vmap mode, K = {max(args.chunks)}):')
  for chunk in args.chunks:
    r = run_child(model=args.models[0], mode='vmap', k=max(args.chunks), chunk=chunk, tau=args.tau,
                  batch=args.batch, memory_only=True)
    print(f'  chunk {chunk:>3}: {r["peak_bytes"] / 2**20:8.0f} MiB')
  print('reproduce: .venv/bin/python bench/bench_fitness.py ' + ' '.join(sys.argv[1:]))


if __name__ == '__main__':
  main()
