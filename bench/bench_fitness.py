"""Seconds per search candidate of every fitness mode, against the original PIC-PQ's, measured in one run.

A candidate: prune to the FLOPs target (--keep, 0.45), tau SGD steps of batch --batch (128) from the
baseline, the validation loss over --val-images (5,000, in batches of 500; the original's loader: 128).
Every mode runs in this one process and the original (PyTorch) in a worker process (bench/torch_worker.py),
round-robin, each timed call on a new random candidate whose target is reachable (a new plan: the 'sliced'
mode compiles for it, as it does for nearly every candidate of a search). Synthetic data and random weights
(the cost does not depend on them).

tau 200 is long on a 2-core machine, so a candidate is timed at --measure-tau (20) and given at --tau (200)
as T(20) + 180 x (its median step time): every candidate of 'host' and 'sliced' times its own steps
(PopulationFitness.step_seconds), the original's runs --extra-steps more steps of its pruned model after its
validation, timed one by one. A median step is not moved by a spike of a loaded machine, where a difference
of two whole candidates would be. 'vmap' and 'map' run the steps and the validation inside one compiled
program (25-50x slower on XLA CPU): they are timed at tau 1 and 2 with one validation batch and once more
with two, and the straight line through those is taken to --tau and the full validation. For 'host',
'vmap' and 'map' the first call compiles, once per search: the table adds that spread over a search of
400 candidates. A 'sliced' candidate's time includes its own compile.

The original: with $PICPQ_ORIGINAL pointing at a checkout of github.com/fanxxxxyi/PIC-PQ, its own
learn_ranking_ea work for one candidate (bench/torch_reference.py, 'original'); without, the same work
written out in PyTorch ('candidate': a physically pruned ResNet, SGD, validation); without torch, skipped
with a message. Ratios are per round (ours / the original's, both at --tau), median over rounds.

  TORCH_PYTHON=/tmp/torchvenv/bin/python PICPQ_ORIGINAL=/tmp/PIC-PQ \\
      .venv/bin/python bench/bench_fitness.py                       # ResNet-56, tau 20 -> 200
  TORCH_THREADS=1 taskset -c 0 ... --cpu-time         # one core each, CPU seconds (steady under load)
  .venv/bin/python bench/bench_fitness.py --modes host sliced --rounds 3

--sweep (issue #14, for GPUs and TPUs; unchanged on a CPU, where it is slow): the 'vmap' mode on one device
with K = --sweep-k (1, 4, 16, 64) candidates per call, at --tau and the full validation: candidates per
second of one call of K against K calls of one (the median of min(K, 4) single calls, times K), and the
device's peak memory after each K (chunk sizes in increasing order, so each peak is that chunk's; 'n/a' where
the backend reports none, as XLA CPU does). The first call of each K compiles and is not counted.

  .venv/bin/python bench/bench_fitness.py --sweep                                # ResNet-56, tau 200, batch 128
  .venv/bin/python bench/bench_fitness.py --sweep --arch resnet20 --tau 2 --val-images 500 --sweep-k 1 4  # CPU
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SEARCH_LENGTH = 400  # evaluations of the original's search: a one-off compile is spread over these
LOOP_MODES = ('vmap', 'map')  # tau and the validation run inside the compiled program


class Bench:
  """The model, baseline, filter properties and candidates shared by every mode."""

  def __init__(self, arch, keep, batch, val_batch, seed=0):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from configs import common  # pylint: disable=g-import-not-at-top
    from picpq_jax import models, pruning, topology  # pylint: disable=g-import-not-at-top
    self.np, self.jax = np, jax
    self.cfg = common.base_config().search
    self.cfg.keep_fraction, self.cfg.batch_size = keep, batch
    self.batch, self.val_batch = batch, val_batch
    self.spec = models.get_spec(arch, 10, 32, 3)
    self.model, self.topo = models.Net(self.spec), topology.topology_from_spec(self.spec)
    self.variables = jax.device_get(jax.jit(lambda: self.model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))())
    self.rng = np.random.default_rng(seed)
    self.fp = pruning.pad_filter_properties(
        self.topo, [self.rng.integers(0, 32, l.out_channels) for l in self.topo.layers])
    self._candidates = []
    from picpq_jax import fitness  # pylint: disable=g-import-not-at-top
    self.fns = fitness.CandidateFns(self.model, self.topo, self.fp, self.cfg)
    self.prune = jax.jit(jax.vmap(self.fns.prune))

  def batches(self, n, batch):
    np = self.np
    return {'image': self.rng.normal(size=(n, batch, 32, 32, 3)).astype(np.float32),
            'label': self.rng.integers(0, 10, (n, batch)).astype(np.int32)}

  def evaluator(self, mode, tau, val_batches):
    from picpq_jax import fitness  # pylint: disable=g-import-not-at-top
    return fitness.PopulationFitness(self.fns, self.variables, self.batches(tau, self.batch),
                                     self.batches(val_batches, self.val_batch), mode=mode)

  def widths(self, a, b):
    """The kept output channels of every conv of a (1, L) candidate's plan."""
    return [int(w) for w in self.jax.device_get(self.prune(a, b))[1]['keep'][0]]

  def candidate(self):
    """(a, b) of one (1, L) candidate that reaches the target, each call a new one."""
    np, jax = self.np, self.jax
    if not self._candidates:
      n = self.topo.num_layers
      a = np.exp(self.rng.normal(size=(256, n))).astype(np.float32)
      b = (self.rng.normal(size=(256, n)) * 9).astype(np.float32)  # the properties' spread
      _, info = jax.device_get(self.prune(a, b))
      self._candidates = [(a[i:i + 1], b[i:i + 1]) for i in np.flatnonzero(info['reached'])]
    return self._candidates.pop()

  def candidates(self, k):
    """(a, b), each (k, L): k candidates that reach the target."""
    pairs = [self.candidate() for _ in range(k)]
    return tuple(self.np.concatenate(x) for x in zip(*pairs))


CLOCK = {'tick': time.perf_counter}  # --cpu-time: time.process_time


def timed(fn):
  t0 = CLOCK['tick']()
  fn()
  return CLOCK['tick']() - t0


def line(t_a, t_b, tau_a, tau_b, tau):
  """T(tau) on the straight line through (tau_a, t_a) and (tau_b, t_b)."""
  return t_b + (tau - tau_b) * (t_b - t_a) / (tau_b - tau_a)


def peak_memory_bytes(device):
  """The device's peak bytes in use so far, or None where the backend does not report it (XLA CPU)."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def vmap_sweep(bench, ks, tau, n_val):
  """Candidates per second of 'vmap' on one device, K per call against K calls of one, and peak memory."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from picpq_jax import fitness  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  mesh = Mesh(np.array([device]), ('data',))
  train, val = bench.batches(tau, bench.batch), bench.batches(n_val, bench.val_batch)

  def evaluator(k):
    return fitness.PopulationFitness(bench.fns, bench.variables, train, val, chunk_size=k, mode='vmap', mesh=mesh)

  single = evaluator(1)
  compile_1 = timed(lambda: single(*bench.candidates(1)))
  print(f'  K=1 first call (compile + one candidate) {compile_1:.1f} s', flush=True)
  print(f'\n{"K":>4} {"cand/s, one call of K":>22} {"cand/s, K calls of 1":>21} {"speed-up":>9} '
        f'{"peak memory":>12}')
  for k in ks:
    batched = single if k == 1 else evaluator(k)
    first = compile_1 if k == 1 else timed(lambda: batched(*bench.candidates(k)))
    a, b = bench.candidates(k)
    t_k = timed(lambda: batched(a, b))
    n = min(k, 4)
    t_1 = float(np.median([timed(lambda i=i: single(a[i:i + 1], b[i:i + 1])) for i in range(n)])) * k
    peak = peak_memory_bytes(device)
    peak_s = f'{peak / 2**30:9.2f} GiB' if peak is not None else f'{"n/a":>12}'
    print(f'{k:>4} {k / t_k:22.3f} {k / t_1:21.3f} {t_1 / t_k:8.2f}x {peak_s}   '
          f'(compile {first - t_k:.0f} s)', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='resnet56')
  parser.add_argument('--tau', type=int, default=200, help='the tau the figures are given at')
  parser.add_argument('--measure-tau', type=int, default=20, help="the tau measured ('host', 'sliced', original)")
  parser.add_argument('--extra-steps', type=int, default=10, help="the original's steps timed one by one")
  parser.add_argument('--loop-taus', type=int, nargs=2, default=[1, 2], help="the two taus of 'vmap' / 'map'")
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--val-images', type=int, default=5000)
  parser.add_argument('--val-batch', type=int, default=500)
  parser.add_argument('--keep', type=float, default=0.45)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--modes', nargs='+', default=['host', 'sliced', 'vmap', 'map'])
  parser.add_argument('--sweep', action='store_true', help="only the 'vmap' K sweep (see above)")
  parser.add_argument('--sweep-k', type=int, nargs='+', default=[1, 4, 16, 64])
  parser.add_argument('--cpu-time', action='store_true',
                      help='CPU seconds of each process instead of wall seconds: with everything on one core '
                      '(taskset -c 0, TORCH_THREADS=1) they are what an idle core would take, load or not')
  args = parser.parse_args()
  clock = 'cpu' if args.cpu_time else 'wall'
  if args.cpu_time:
    CLOCK['tick'] = time.process_time
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  flags = xla_setup.configure_cpu()
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch_worker  # pylint: disable=g-import-not-at-top
  from bench_train_step import cpu_name  # pylint: disable=g-import-not-at-top

  bench = Bench(args.arch, args.keep, args.batch, args.val_batch)
  n_val = args.val_images // args.val_batch
  if args.sweep:
    import jax  # pylint: disable=g-import-not-at-top
    print(f'{jax.local_devices()[0].device_kind} ({jax.default_backend()}); {args.arch}, keep {args.keep:.0%} of '
          f'the FLOPs, tau {args.tau}, batch {args.batch}, {n_val * args.val_batch} validation images; {clock} '
          'seconds')
    vmap_sweep(bench, sorted(args.sweep_k), args.tau, n_val)
    print('reproduce: ' + ' '.join(['.venv/bin/python', 'bench/bench_fitness.py'] + sys.argv[1:]))
    return
  print(f'CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} core(s) usable; load average at start '
        f'{os.getloadavg()[0]:.1f}; XLA_FLAGS={flags!r}; {clock} seconds')
  print(f'{args.arch}, keep {args.keep:.0%} of the FLOPs, batch {args.batch}, {n_val * args.val_batch} '
        f'validation images; measured at tau {args.measure_tau} ({args.loop_taus} for {"/".join(LOOP_MODES)}), '
        f'given at tau {args.tau}; {args.rounds} round(s)')

  worker = torch_worker.TorchWorker.start()
  original_dir = os.environ.get(torch_worker.ORIGINAL_ENV)
  if worker is None:
    print(torch_worker.skip_message())

  # Every mode's evaluators, compiled by a first (timed) call. points: (tau, validation batches) measured.
  plans = {}
  for mode in args.modes:
    if mode in LOOP_MODES:
      pts = [(args.loop_taus[0], 1), (args.loop_taus[1], 1), (args.loop_taus[0], 2)]
    else:
      pts = [(args.measure_tau, n_val)]
    evaluators = {p: bench.evaluator(mode, *p) for p in pts}
    first = {p: timed(lambda e=e: e(*bench.candidate())) for p, e in evaluators.items()}
    plans[mode] = (pts, evaluators, first)
    print(f'  {mode}: first call (compile + one candidate) {", ".join(f"{v:.0f} s" for v in first.values())}',
          flush=True)

  rows = {mode: [] for mode in args.modes}  # per round: seconds at args.tau
  steady = {mode: [] for mode in args.modes}  # per round: {point: seconds}
  original_rows = []
  first_steps = []  # 'sliced': the first step's time over the median (its compile)
  lines = {mode: [] for mode in args.modes}  # 'host', 'sliced': per round (seconds at tau 0, seconds per step)
  for r in range(args.rounds):
    for mode in args.modes:
      pts, evaluators, _ = plans[mode]
      for p, e in evaluators.items():
        e.step_seconds = [] if mode not in LOOP_MODES else None
        e.step_clock = CLOCK['tick']
      t = {p: timed(lambda e=e: e(*bench.candidate())) for p, e in evaluators.items()}
      steady[mode].append(t)
      if mode in LOOP_MODES:
        (ta, va), (tb, _), _ = pts
        per_val = t[pts[2]] - t[pts[0]]  # one more validation batch
        at_tau = line(t[pts[0]], t[pts[1]], ta, tb, args.tau) + (n_val - va) * per_val
        note = ''
      else:
        times = evaluators[pts[0]].step_seconds
        step = float(np.median(times[1:] if mode == 'sliced' else times))  # a sliced first step compiles
        if mode == 'sliced':
          first_steps.append(times[0] - step)
        at_tau = t[pts[0]] + (args.tau - args.measure_tau) * step
        lines[mode].append((t[pts[0]] - args.measure_tau * step, step))
        note = f', median step {step:.2f} s'
      rows[mode].append(at_tau)
      print(f'  round {r + 1} {mode}: ' + ', '.join(f'tau {p[0]}/{p[1]} val batches {v:.1f} s' for p, v in t.items())
            + f'{note} -> {at_tau:.0f} s at tau {args.tau}', flush=True)
    if worker:
      kw = dict(tau=args.measure_tau, val_images=args.val_images, batch=args.batch, extra_steps=args.extra_steps,
                clock=clock)
      if original_dir:
        out = worker.call('original', dir=original_dir, keep_fraction=args.keep, **kw)
      else:
        out = worker.call('candidate', widths=bench.widths(*bench.candidate()), **kw)
      step = float(np.median(out['step_times']))
      original_rows.append(out['seconds'] + (args.tau - args.measure_tau) * step)
      print(f'  round {r + 1} original: tau {args.measure_tau} {out["seconds"]:.1f} s, median step {step:.2f} s '
            f'-> {original_rows[-1]:.0f} s at tau {args.tau}', flush=True)
  if worker:
    worker.close()

  what = ('the original PIC-PQ code' if original_dir else 'the original\'s work written in PyTorch')
  print(f'\nseconds per candidate at tau {args.tau}, {n_val * args.val_batch} validation images '
        f'(median over rounds; ratio = ours / {what}, paired per round):')
  print(f'{"mode":<10} {"s/candidate":>12} {"+ compile/400":>14} {"ratio":>7}')
  for mode in args.modes:
    pts, _, first = plans[mode]
    s = float(np.median(rows[mode]))
    ratio = (f'{np.median([m / o for m, o in zip(rows[mode], original_rows)]):7.2f}' if original_rows else '      -')
    if mode == 'sliced':  # each candidate compiles its own step: its first step's extra time
      compile_s = float(np.median(first_steps))
      print(f'{mode:<10} {s:12.0f} {s:14.0f} {ratio}   (each candidate\'s train step compiles in ~{compile_s:.0f} s)')
      continue
    # A first call's extra time is the compile, once per search.
    compile_s = float(np.median([first[p] - np.median([t[p] for t in steady[mode]]) for p in pts]))
    once = max(0.0, compile_s) / SEARCH_LENGTH
    print(f'{mode:<10} {s:12.0f} {s + once:14.0f} {ratio}   (the first call compiles in ~{compile_s:.0f} s)')
  if original_rows:
    print(f'{"original":<10} {np.median(original_rows):12.0f} {"":>14} {1.0:7.2f}   (PyTorch {worker.version})')
  if lines.get('host') and lines.get('sliced'):
    (a_h, b_h), (a_s, b_s) = (np.median(np.asarray(lines[m]), axis=0) for m in ('host', 'sliced'))
    crossover = (a_s - a_h) / (b_h - b_s) if b_h > b_s else float('inf')
    print(f"'sliced' is faster than 'host' from tau ~{crossover:.0f} on (fitness.SLICED_MIN_TAU: 'auto' picks it "
          f'from there; a sliced step {b_s / b_h:.2f}x a host step, {a_s - a_h:.0f} s more per candidate besides)')
  print('reproduce: ' + ' '.join(['.venv/bin/python', 'bench/bench_fitness.py'] + sys.argv[1:]))


if __name__ == '__main__':
  main()
