"""Train-step speed of a CIFAR ResNet (batch 128): ours against PyTorch's on the same model and batch, dense,
masked (the 'host' fitness's step) and sliced (the 'sliced' fitness's step) to one pruning plan, under each
XLA CPU setting and instruction-set path.

One process per XLA setting (XLA reads XLA_FLAGS once at start-up). In each, the variants run round-robin
(`--rounds` rounds of `--steps` steps, after a compiling call), so that a machine's changing load falls on all
of them alike; a ratio is the median over rounds of the per-round ratio of medians. PyTorch (bench/
torch_worker.py: $TORCH_PYTHON, or this Python if it has torch) runs in its own process, interleaved with ours
in the same rounds, on a model of the same widths (bench/torch_reference.py); without torch its columns are
skipped with a message. The plan: the filter properties are random, (a, b) = (1, 0), FLOPs kept =
--keep (0.45, the original's ResNet-56 setting).

Settings: 'default' (no XLA_FLAGS) and 'fast' (xla_setup.FAST_CPU_FLAGS); the header says which one
xla_setup.cpu_flags() picks for this CPU. `--isa AVX` (etc.) adds `--xla_cpu_max_isa=AVX` to each setting:
XLA then emits code for that instruction set only, to measure a lower path on a machine that has a higher one.
`--memory kept` (the default: what every entry point does, xla_setup.keep_freed_memory) and/or `returned`
(glibc's default: XLA's per-step buffers mapped afresh and faulted in every step), one process each; each
variant prints its minor page faults per step.

  TORCH_PYTHON=/tmp/torchvenv/bin/python .venv/bin/python bench/bench_train_step.py
  TORCH_PYTHON=... .venv/bin/python bench/bench_train_step.py --cores 0 --cpu-time --settings fast   # one core
  .venv/bin/python bench/bench_train_step.py --arch resnet20 --rounds 3 --isa native AVX
  .venv/bin/python bench/bench_train_step.py --settings fast --memory kept returned
"""
import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ('dense', 'masked', 'sliced')


def cpu_name() -> str:
  """The CPU's model name and its widest vector ISA, from /proc/cpuinfo (what lscpu prints)."""
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  name = 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          name = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return f'{name}, {os.cpu_count()} cores, {xla_setup.cpu_isa()}'


def jax_variants(arch: str, batch: int, keep: float):
  """name -> (compiled step, state, batch) for VARIANTS, and the kept widths of the plan."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from picpq_jax import export, fitness, models, pruning, topology, training  # pylint: disable=g-import-not-at-top
  cfg = common.base_config().search
  cfg.keep_fraction = keep
  spec = models.get_spec(arch, 10, 32, 3)
  model, topo = models.Net(spec), topology.topology_from_spec(spec)
  variables = jax.device_get(jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))())
  rng = np.random.default_rng(0)
  fp = pruning.pad_filter_properties(topo, [rng.integers(0, 32, l.out_channels) for l in topo.layers])
  fns = fitness.CandidateFns(model, topo, fp, cfg)
  masks, _ = jax.device_get(fns.prune(jnp.ones(topo.num_layers), jnp.zeros(topo.num_layers)))
  keep_idx = export.kept_indices(spec, masks)
  data = {'image': jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
  out = {}
  for name in VARIANTS:
    m, v, mk = model, variables, None
    if name == 'masked':  # as the 'host' fitness runs it: the masks folded into BatchNorm
      m = fitness.MasksInBatchNorm(model)
      mk = {k: jnp.asarray(x) for k, x in masks.items()}
    elif name == 'sliced':  # as the 'sliced' fitness runs it: widths rounded up, the padding masked
      keep_r, slim_masks = fitness.round_up_widths(spec, keep_idx, fitness.SLICE_WIDTH_MULTIPLE)
      m = fitness.MasksInBatchNorm(model.clone(spec=export.slim_spec(spec, keep_r), parent=None))
      v = export.slice_variables(spec, variables, keep_r)
      mk = {k: jnp.asarray(x) for k, x in slim_masks.items()}
    state = jax.device_put(fns.start(jax.tree.map(lambda x: np.array(x, copy=True), v)), jax.devices()[0])
    step = jax.jit(training.make_train_step(m, fns.tx), donate_argnums=0)
    out[name] = (step, state, data, mk)
  widths = [len(keep_idx[c.name]) for c in spec.convs]
  return out, widths


def child(args) -> None:
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  if args.memory == ['kept']:  # a child is given one
    xla_setup.keep_freed_memory()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch_worker  # pylint: disable=g-import-not-at-top
  variants, widths = jax_variants(args.arch, args.batch, args.keep)
  tick = time.process_time if args.cpu_time else time.perf_counter
  clock = 'cpu' if args.cpu_time else 'wall'
  states, compile_s = {}, {}
  for name, (step, state, data, mk) in variants.items():
    t0 = time.perf_counter()
    state, m = step(state, data, mk)
    jax.block_until_ready(m)
    compile_s[name] = time.perf_counter() - t0
    states[name] = state
  workers = {}
  if args.torch:  # one PyTorch process per model, each set up once
    dense = [16] + [w for w in (16, 32, 64) for _ in range(2 * ((len(widths) - 1) // 6))]
    for name, w in (('torch dense', dense), ('torch sliced', widths)):
      workers[name] = torch_worker.TorchWorker.start()
      workers[name].call('setup', widths=w, batch=args.batch)
      workers[name].call('steps', n=1)  # warm-up
  rounds, faults = [], {name: [] for name in variants}
  for _ in range(args.rounds):
    r = {}
    for name, (step, _, data, mk) in variants.items():
      times = []
      for _ in range(args.steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = tick()
        states[name], m = step(states[name], data, mk)
        jax.block_until_ready(m)
        times.append(tick() - t0)
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
      r[name] = float(np.median(times))
    for name, w in workers.items():
      r[name] = float(np.median(w.call('steps', n=args.steps, clock=clock)['times']))
    rounds.append(r)
  version = None
  for w in workers.values():
    version = w.version
    w.close()
  print(json.dumps({'rounds': rounds, 'compile_s': compile_s, 'widths': widths, 'torch': version,
                    'faults': {k: float(np.median(v)) for k, v in faults.items()}}))


def median_ratio(rounds, a, b):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return float(np.median([r[a] / r[b] for r in rounds]))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='resnet56')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3, help='steps per variant per round')
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--keep', type=float, default=0.45)
  parser.add_argument('--settings', nargs='+', default=['default', 'fast'], help="XLA settings: 'default', 'fast'")
  parser.add_argument('--isa', nargs='+', default=['native'], help="'native' and/or an xla_cpu_max_isa value")
  parser.add_argument('--cores', default='', help="e.g. '0': run pinned to these cores (taskset), PyTorch with "
                      'as many threads; a loaded machine hurts multi-threaded runs unevenly')
  parser.add_argument('--cpu-time', action='store_true', help='CPU seconds per step (with --cores 0: one core '
                      'each, steady under load) instead of wall seconds')
  parser.add_argument('--memory', nargs='+', default=['kept'], choices=['kept', 'returned'],
                      help="'kept': xla_setup.keep_freed_memory, as the entry points run; 'returned': glibc's default")
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--torch', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch_worker  # pylint: disable=g-import-not-at-top
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  have_torch = torch_worker.torch_python() is not None
  print(f'CPU: {cpu_name()}; load average at start {os.getloadavg()[0]:.1f}; xla_setup picks '
        f'{xla_setup.cpu_flags()!r}')
  print(f'{args.arch}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps per variant (median per '
        f'round), plan keeping {args.keep:.0%} of the FLOPs' + (f', pinned to cores {args.cores}' if args.cores else '')
        + (', CPU seconds' if args.cpu_time else ', wall seconds'))
  if not have_torch:
    print(torch_worker.skip_message())
  flags = {'default': '', 'fast': xla_setup.FAST_CPU_FLAGS}
  results = {}
  for isa, setting, memory in itertools.product(args.isa, args.settings, args.memory):
    f = flags[setting] + ('' if isa == 'native' else f' --xla_cpu_max_isa={isa}')
    with_torch = have_torch and setting == 'fast' and isa == args.isa[0]
    env = dict(os.environ, XLA_FLAGS=f.strip(), TF_CPP_MIN_LOG_LEVEL='3')
    pin = []
    if args.cores:
      pin = ['taskset', '-c', args.cores]
      env['TORCH_THREADS'] = str(len(args.cores.split(',')))
    argv = pin + [sys.executable, __file__, '--child', '--arch', args.arch, '--batch', str(args.batch), '--steps',
            str(args.steps), '--rounds', str(args.rounds), '--keep', str(args.keep), '--memory', memory] + (
                ['--torch'] * with_torch) + (['--cpu-time'] * args.cpu_time)
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode:
      raise RuntimeError(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    results[(isa, setting, memory)] = r
    med = {k: float(np.median([x[k] for x in r['rounds']])) for k in r['rounds'][0]}
    print(f'\n[{isa} ISA, XLA setting {setting!r}: XLA_FLAGS={f.strip()!r}; freed memory {memory}]')
    for k, v in med.items():
      extra = f'  compile+first {r["compile_s"][k]:.1f} s' if k in r['compile_s'] else ''
      extra += f'  {r["faults"][k]:,.0f} page faults/step' if k in r['faults'] else ''
      print(f'  {k:<13} {v * 1e3:8.0f} ms/step{extra}')
    print(f'  masked / dense {median_ratio(r["rounds"], "masked", "dense"):.3f}   '
          f'sliced / dense {median_ratio(r["rounds"], "sliced", "dense"):.3f}')
    if r['torch']:
      print(f'  PyTorch {r["torch"]}: ours / PyTorch, dense {median_ratio(r["rounds"], "dense", "torch dense"):.3f}'
            f'   sliced {median_ratio(r["rounds"], "sliced", "torch sliced"):.3f}   '
            f'(PyTorch sliced / dense {median_ratio(r["rounds"], "torch sliced", "torch dense"):.3f})')
  for isa, memory in itertools.product(args.isa, args.memory):
    if (isa, 'default', memory) in results and (isa, 'fast', memory) in results:
      d = np.median([x['dense'] for x in results[(isa, 'default', memory)]['rounds']])
      f = np.median([x['dense'] for x in results[(isa, 'fast', memory)]['rounds']])
      print(f'{isa} ISA, memory {memory}: default / fast dense step {d / f:.2f} (separate processes, not paired)')
  print('reproduce: ' + ' '.join(['.venv/bin/python', 'bench/bench_train_step.py'] + sys.argv[1:]))


if __name__ == '__main__':
  main()
