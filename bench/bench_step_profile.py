"""Where a train step's time goes on XLA CPU: the step's compiled operations, traced by JAX's profiler and
summed by kind (convolutions, YNNPACK element-wise fusions, transposes, materialized broadcasts, ...).

The variants are bench_train_step.py's (ResNet, batch 128, one pruning plan): 'dense', 'masked' (the 'host'
fitness's step) and 'sliced' (the 'sliced' fitness's, widths rounded as fitness.round_up_widths does). Each
is compiled, run once, then --steps steps are traced; a row is an operation kind with its milliseconds per
step (summed over the XLA threads' events, so on many cores it can exceed the wall time) and its count per
step. An operation's kind is its HLO name without the number: 'conv_general_dilated' are the forward
convolutions, 'convolution' the backward ones (input and kernel gradients), 'transpose_copy_fusion' mostly
the activations laid out for the kernel-gradient convolutions, 'bitcast_broadcast_fusion' a per-channel
vector written out to a whole activation for a YNNPACK fusion. Compare two variants' rows to find where one
costs more (the issue's mask overhead: 'masked' against 'dense').

The profiler's own allocations can move XLA's per-step buffers to fresh memory (xla_setup.keep_freed_memory),
so a traced step may fault its buffers in again and run 2-3x slower than untraced (seen 2026-12-02 on an Intel
Xeon, on whichever variant it hit): each variant's line prints its page faults per traced step; where they are
not near 0, compare that variant's figures with care or run it again.

Run it on one core (taskset): there every operation, the convolutions included, is one traced event; with
more cores XLA splits a convolution into untraced pieces and its row is missing (the header line then shows
the operations' sum well under the wall time). Reads the trace with TensorFlow's xplane protos
(tensorflow-cpu is in requirements.txt).

  taskset -c 0 .venv/bin/python bench/bench_step_profile.py           # ResNet-56, dense masked sliced
  taskset -c 0 .venv/bin/python bench/bench_step_profile.py --variants dense masked --steps 3
"""
import argparse
import collections
import glob
import os
import re
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def op_kind(name: str) -> str:
  """'ynn_fusion.624' -> 'ynn_fusion', 'conv_general_dilated.165' -> 'conv_general_dilated'."""
  return re.sub(r'(\.\d+)+$', '', name)


def traced_ops(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
  """(kind -> picoseconds, kind -> count) over the XLA operations of the trace in `trace_dir`."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  path = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)[0]
  space = xplane_pb2.XSpace()
  with open(path, 'rb') as f:
    space.ParseFromString(f.read())
  total, count = collections.Counter(), collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if line.name == 'python':  # Python's own calls; the operations run on XLA's threads
        continue
      for event in line.events:
        name = names.get(event.metadata_id, '')
        if not name or name.startswith(('ThunkExecutor', 'end: ', '$')) or '::' in name:
          continue  # a wait, an event's end marker, a Python frame, a runtime call (not an operation)
        total[op_kind(name)] += event.duration_ps
        count[op_kind(name)] += 1
  return total, count


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='resnet56')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--keep', type=float, default=0.45)
  parser.add_argument('--steps', type=int, default=2, help='steps traced per variant')
  parser.add_argument('--variants', nargs='+', default=['dense', 'masked', 'sliced'])
  parser.add_argument('--top', type=int, default=12, help='rows per variant')
  args = parser.parse_args()
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  flags = xla_setup.configure_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  import bench_train_step  # pylint: disable=g-import-not-at-top
  print(f'CPU: {bench_train_step.cpu_name()}; XLA_FLAGS={flags!r}; {args.arch}, batch {args.batch}, '
        f'keep {args.keep:.0%} of the FLOPs; ms per step summed over XLA threads, {args.steps} steps traced')
  variants, _ = bench_train_step.jax_variants(args.arch, args.batch, args.keep)
  for name in args.variants:
    step, state, data, masks = variants[name]
    state, metrics = step(state, data, masks)  # compiles
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
      t0, f0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
          state, metrics = step(state, data, masks)
          jax.block_until_ready(metrics)
      wall = (time.perf_counter() - t0) / args.steps
      faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // args.steps
      total, count = traced_ops(trace_dir)
    ms = {k: v / 1e9 / args.steps for k, v in total.items()}
    print(f'\n{name}: {sum(ms.values()):.0f} ms of operations per step ({wall * 1e3:.0f} ms wall, traced; '
          f'{faults:,} page faults per step)')
    for kind, v in sorted(ms.items(), key=lambda kv: -kv[1])[:args.top]:
      print(f'  {v:8.1f} ms  {count[kind] // args.steps:5d}x  {kind}')
  print(f'\nreproduce: taskset -c 0 .venv/bin/python bench/bench_step_profile.py --arch {args.arch} --steps {args.steps} '
        f'--variants {" ".join(args.variants)}')


if __name__ == '__main__':
  main()
