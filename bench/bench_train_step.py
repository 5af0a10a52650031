"""Train-step speed of ResNet-20 and ResNet-56 (CIFAR, batch 128) with and without the fast XLA CPU setting.

Measures images/s of the jitted train step (forward + backward + SGD update, BatchNorm in training mode)
after compilation, and the GFLOP/s it achieves, counting a train step as 3x the forward pass and a MAC as
2 FLOPs (cost.flops gives the MACs). Each XLA setting runs in its own process, because XLA reads XLA_FLAGS
once at start-up.

  .venv/bin/python bench/bench_train_step.py            # both settings, both models
  .venv/bin/python bench/bench_train_step.py --steps 10
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(arch: str, batch: int, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from picpq_jax import cost, models, topology, training  # pylint: disable=g-import-not-at-top

  model = models.create_model(arch, 10, 32, 3)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  state = training.create_train_state(model, tx, jax.random.key(0), (32, 32, 3))
  step = jax.jit(training.make_train_step(model, tx), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch_ = {'image': jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32),
            'label': jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
  t0 = time.perf_counter()
  state, m = step(state, batch_)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batch_)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  topo = topology.get_topology(arch, 10, 32, 3)
  macs = float(cost.flops(topo, cost.dense_keep(topo)))
  return {'arch': arch, 'batch': batch, 'step_ms': 1e3 * step_s, 'images_per_s': batch / step_s,
          'gflop_per_s': 3 * 2 * macs * batch / step_s / 1e9, 'compile_s': compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.batch, args.steps)))
    return
  from picpq_jax.xla_setup import FAST_CPU_FLAGS  # pylint: disable=g-import-not-at-top
  settings = {'XLA default': '', 'fast CPU setting': FAST_CPU_FLAGS}
  print(f'cores: {os.cpu_count()}, batch {args.batch}, median of {args.steps} steps after compile')
  print(f'{"model":<10} {"XLA_FLAGS":<70} {"ms/step":>8} {"img/s":>7} {"GFLOP/s":>8}')
  for arch in ('resnet20', 'resnet56'):
    for label, flags in settings.items():
      env = dict(os.environ, XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL='3')
      out = subprocess.run([sys.executable, __file__, '--child', arch, '--steps', str(args.steps), '--batch',
                            str(args.batch)], env=env, capture_output=True, text=True, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f'{arch:<10} {(flags or "(none: " + label + ")"):<70} {r["step_ms"]:8.0f} {r["images_per_s"]:7.0f} '
            f'{r["gflop_per_s"]:8.1f}')
  print('reproduce: .venv/bin/python bench/bench_train_step.py --steps', args.steps)


if __name__ == '__main__':
  main()
