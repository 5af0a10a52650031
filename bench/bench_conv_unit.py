"""Where XLA's CPU kernels stand against PyTorch's, one conv unit at a time: a 3x3 convolution's forward, its
input gradient and its kernel gradient, and a whole conv -> BatchNorm (training mode) -> ReLU unit forward and
backward, at ResNet-56's three stage shapes (batch 128), ours and PyTorch's in the same run.

Why: the train step is the search's cost (issue #15), and what is left of its gap to PyTorch's is in these
kernels (XLA's Eigen convolution and YNNPACK element-wise fusions, not code of ours): re-run this on each new
jaxlib, and bench_train_step.py / bench_fitness.py when it moves. Ours runs under this process's XLA setting
(xla_setup.configure_cpu, or your XLA_FLAGS); PyTorch in its own process (bench/torch_worker.py: $TORCH_PYTHON,
or this Python if it has torch; skipped with a message without), with as many threads as this process may use
cores. `--rounds` rounds, each timing every part `--steps` times in both (median per round); a ratio is the
median over rounds of ours / PyTorch's. Run it on one core for figures that do not depend on how each library
splits work between threads:

  TORCH_PYTHON=/tmp/torchvenv/bin/python taskset -c 0 .venv/bin/python bench/bench_conv_unit.py
  XLA_FLAGS= TORCH_PYTHON=... taskset -c 0 .venv/bin/python bench/bench_conv_unit.py   # XLA's default setting
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ((32, 16, 16), (16, 32, 32), (8, 64, 64))  # (height = width, in, out channels): ResNet-56's stages
PARTS = ('forward', 'input_grad', 'kernel_grad', 'unit')


def jax_parts(hw: int, c_in: int, c_out: int, batch: int) -> dict:
  """part -> (jitted function, its arguments), the same computations as torch_reference's 'unit' command."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from picpq_jax.models import layers  # pylint: disable=g-import-not-at-top

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  class Unit(nn.Module):  # the model's unit (layers.MaskedQConv) without masks or quantizers
    @nn.compact
    def __call__(self, x, w):
      y = nn.BatchNorm(use_running_average=False, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON)(conv(x, w))
      return jax.nn.relu(y)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, hw, hw, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) * 0.1, jnp.float32)
  dy = jnp.asarray(rng.normal(size=(batch, hw, hw, c_out)), jnp.float32)
  unit = Unit()
  variables = unit.init(jax.random.key(0), x, w)

  def unit_loss(params, x, w):
    y, _ = unit.apply({**variables, 'params': params}, x, w, mutable=['batch_stats'])
    return jnp.sum(y * dy)

  return {
      'forward': (jax.jit(conv), (x, w)),
      'input_grad': (jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]), (x, w, dy)),
      'kernel_grad': (jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]), (x, w, dy)),
      'unit': (jax.jit(jax.grad(unit_loss, (0, 1, 2))), (variables['params'], x, w)),
  }


def time_calls(fn, args, n: int) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=5, help='timed calls per part per round')
  args = parser.parse_args()
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  flags = xla_setup.configure_cpu()
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch_worker  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  worker = torch_worker.TorchWorker.start(threads=cores)
  print(f'CPU: {xla_setup.cpu_isa()}, {cores} core(s) usable; XLA_FLAGS={flags!r}; batch {args.batch}; '
        f'ms, median over {args.rounds} rounds of {args.steps} calls')
  if worker is None:
    print(torch_worker.skip_message())
  print(f'{"shape":<14}{"part":<13}{"ours":>9}{"PyTorch":>9}{"ratio":>8}')
  for hw, c_in, c_out in SHAPES:
    parts = jax_parts(hw, c_in, c_out, args.batch)
    ours, theirs = {p: [] for p in PARTS}, {p: [] for p in PARTS}
    for _ in range(args.rounds):
      for part in PARTS:
        ours[part].append(float(np.median(time_calls(*parts[part], args.steps))))
      if worker is not None:
        out = worker.call('unit', hw=hw, c_in=c_in, c_out=c_out, batch=args.batch, n=args.steps)
        for part in PARTS:
          theirs[part].append(float(np.median(out[part])))
    for part in PARTS:
      mine = 1e3 * float(np.median(ours[part]))
      row = f'{f"{hw}x{hw} {c_in}->{c_out}":<14}{part:<13}{mine:9.2f}'
      if theirs[part]:
        ratio = float(np.median(np.array(ours[part]) / np.array(theirs[part])))
        row += f'{1e3 * float(np.median(theirs[part])):9.2f}{ratio:8.2f}'
      print(row, flush=True)
  if worker is not None:
    print(f'PyTorch {worker.version}, {cores} thread(s)')
    worker.close()
  print('reproduce: TORCH_PYTHON=... taskset -c 0 .venv/bin/python bench/bench_conv_unit.py '
        f'--batch {args.batch} --rounds {args.rounds} --steps {args.steps}')


if __name__ == '__main__':
  main()
