"""The search pipeline: fitness modes agree, bad settings stop before any work, a killed search.py resumes
to exactly the uninterrupted result."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_mnist5k
from picpq_jax import fitness, models, pruning, topology
from picpq_jax import policy as policy_lib
from picpq_jax.methods import picpq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_search_setup(tau=2, size=8, batch=8):
  config = demo_mnist5k.get_config()
  config.search.tau = tau
  config.search.keep_fraction = 0.6
  spec = models.get_spec('resnet20', 10, size, 1)
  model, topo = models.Net(spec), topology.topology_from_spec(spec)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
  variables['batch_stats'] = jax.tree.map(jnp.abs, variables['batch_stats'])  # positive variances
  fp = [rng.integers(0, size + 1, l.out_channels).astype(np.float32) for l in topo.layers]
  fp_padded = pruning.pad_filter_properties(topo, fp)
  train = {'image': rng.normal(size=(tau, batch, size, size, 1)).astype(np.float32),
           'label': rng.integers(0, 10, (tau, batch)).astype(np.int32)}
  val = {'image': rng.normal(size=(2, batch, size, size, 1)).astype(np.float32),
         'label': rng.integers(0, 10, (2, batch)).astype(np.int32)}
  return config, model, topo, variables, fp_padded, train, val


def test_quantized_fitness_modes_agree():
  """search.quantize: the fine-tune and validation run with the assigned bits, the same in every mode."""
  config, model, topo, variables, fp_padded, train, val = tiny_search_setup()
  config.search.quantize = True
  fns = fitness.CandidateFns(model, topo, fp_padded, config.search)
  a, b = np.ones((2, topo.num_layers), np.float32), np.zeros((2, topo.num_layers), np.float32)
  b[1] = np.linspace(-1, 1, topo.num_layers)
  host = fitness.PopulationFitness(fns, variables, train, val, mode='host')(a, b)
  whole = fitness.PopulationFitness(fns, variables, train, val, chunk_size=2, mode='vmap')(a, b)
  np.testing.assert_allclose(whole['loss'], host['loss'], rtol=2e-4)
  config.search.quantize = False
  plain = fitness.PopulationFitness(fitness.CandidateFns(model, topo, fp_padded, config.search), variables,
                                    train, val, mode='host')(a, b)
  assert np.all(np.abs(plain['loss'] - host['loss']) > 1e-4)  # the bits really were applied


def test_fitness_modes_agree_and_masks_meet_target():
  config, model, topo, variables, fp_padded, train, val = tiny_search_setup()
  fns = fitness.CandidateFns(model, topo, fp_padded, config.search)
  rng = np.random.default_rng(1)
  a = np.exp(rng.normal(size=(3, topo.num_layers))).astype(np.float32)
  b = rng.normal(size=(3, topo.num_layers)).astype(np.float32)
  results = {}
  for mode, chunk in (('host', 1), ('vmap', 2), ('map', 1)):
    results[mode] = fitness.PopulationFitness(fns, variables, train, val, chunk_size=chunk, mode=mode)(a, b)
  for mode in ('vmap', 'map'):
    np.testing.assert_allclose(results[mode]['loss'], results['host']['loss'], rtol=2e-4)
    np.testing.assert_array_equal(results[mode]['flops'], results['host']['flops'])

  # An independent recomputation of one candidate: prune, plain Python loop of train steps, eval.
  masks, info = pruning.global_prune(topo, [fp_padded[l.index, :l.out_channels] for l in topo.layers],
                                     a[0], b[0], config.search.keep_fraction, config.search.safeguard)
  from picpq_jax import training  # pylint: disable=g-import-not-at-top
  tx = fitness.search_optimizer(config.search)
  state = training.TrainState(jnp.zeros((), jnp.int32), variables['params'], variables['batch_stats'],
                              tx.init(variables['params']))
  step = jax.jit(training.make_train_step(model, tx))
  for i in range(train['image'].shape[0]):
    state, _ = step(state, {k: v[i] for k, v in train.items()}, masks)
  logits = jax.jit(model.apply)(state.variables, val['image'].reshape(-1, 8, 8, 1), masks=masks)
  expected = float(training.cross_entropy(logits, val['label'].reshape(-1)))
  assert results['host']['loss'][0] == pytest.approx(expected, rel=2e-4)
  assert bool(info['reached'])
  dense = float(pruning.exact_flops(topo, topo.out_channels))
  assert results['host']['flops'][0] < config.search.keep_fraction * dense


def test_plan_cache_runs_each_distinct_plan_once():
  calls = []

  def evaluate(a, b):
    calls.append(a[:, 0].tolist())
    return a[:, 0] * 10.0

  plans = lambda a, b: [bytes([int(v)]) for v in b[:, 0]]  # noqa: E731  the plan is b's first entry
  cache = fitness.PlanCache(evaluate, plans)
  a = np.array([[1.], [2.], [3.], [4.]], np.float32)
  b = np.array([[7.], [8.], [7.], [9.]], np.float32)  # candidates 0 and 2 share a plan
  np.testing.assert_array_equal(cache(a, b), [10., 20., 10., 40.])  # 2 takes 0's loss, not 30
  assert calls == [[1., 2., 4.]] and cache.evaluated == 3
  np.testing.assert_array_equal(cache(a[:2] + 5, b[:2]), [10., 20.])  # known plans: nothing runs
  assert len(calls) == 1
  fresh = fitness.PlanCache(evaluate, plans)
  fresh.remember(a, b, np.array([10., 20., 10., 40.]))  # a resumed search refills the store
  np.testing.assert_array_equal(fresh(a, b), [10., 20., 10., 40.])
  assert fresh.evaluated == 0
  np.testing.assert_array_equal(fitness.repeated_plans(plans(a, b)), [False, False, True, False])


def test_search_with_plan_cache_equals_search_without():
  """The fitness is a function of the masks, so skipping repeated plans changes nothing in the search."""
  from picpq_jax import evolution  # pylint: disable=g-import-not-at-top
  config, model, topo, variables, fp_padded, train, val = tiny_search_setup()
  s = config.search
  evaluate = fitness.PopulationFitness(fitness.CandidateFns(model, topo, fp_padded, s), variables, train, val,
                                       mode='host')
  prune = jax.jit(lambda a, b: pruning.prune_masks_batched(topo, fp_padded, a, b, s.keep_fraction, s.safeguard))
  plans = lambda a, b: fitness.plan_keys(topo, jax.device_get(prune(a, b)[0]))  # noqa: E731
  std = np.ones(topo.num_layers, np.float32)
  results, caches = {}, {}
  for cached in (False, True):
    losses = lambda a, b: evaluate(a, b)['loss']  # noqa: E731
    if cached:
      losses = caches[cached] = fitness.PlanCache(losses, plans)
    fn = lambda x, losses=losses: losses(*(np.asarray(v) for v in evolution.decode(x, std)))  # noqa: E731
    # One mutated layer per child: many children keep their parent's plan, so the cache is exercised.
    strategy, params = evolution.make_strategy('aging_evolution', topo.num_layers, 4, 2, 12, tournament_size=2,
                                               mutation_fraction=0.05)
    results[cached] = evolution.run_search(strategy, params, fn, jax.random.key(0), topo.num_layers, 12)
  for field in ('history_population', 'history_fitness', 'best_solution', 'best_fitness'):
    np.testing.assert_array_equal(np.asarray(getattr(results[True], field)),
                                  np.asarray(getattr(results[False], field)))
  repeated = fitness.repeated_plans(plans(*(np.asarray(v) for v in evolution.decode(
      results[True].history_population, std))))
  assert repeated.sum() >= 2, 'the toy search should repeat plans, or the comparison proves nothing'
  assert caches[True].evaluated == 12 - repeated.sum()


@pytest.mark.parametrize('override,needle', [
    (('search', 'population', 3), 'search.tournament'),
    (('search', 'tau', -1), 'search.tau'),
    (('search', 'strategy', 'annealing'), 'search.strategy'),
    (('search', 'keep_fraction', 0.01), 'keep_fraction'),
    (('search', 'eval_mode', 'gpu'), 'search.eval_mode'),
])
def test_bad_search_settings_stop_before_any_work(override, needle):
  config = demo_mnist5k.get_config()
  section, key, value = override
  config[section][key] = value
  topo = topology.get_topology('resnet20', 10, 32, 1)
  with pytest.raises(ValueError, match=needle.replace('.', r'\.')):
    picpq.check_config(config, topo)


def search_command(workdir, *extra):
  return [sys.executable, 'search.py', '--config', 'configs/demo_mnist5k.py', '--workdir', str(workdir),
          '--config.model.arch=resnet8', '--config.train.epochs=1', '--config.data.test_size=500',
          '--config.data.train_size=500',
          '--config.data.val_size=200', '--config.train.eval_batch_size=100', '--config.search.val_batch_size=100',
          '--config.search.population=6', '--config.search.tournament=3', '--config.search.total_evaluations=14',
          '--config.search.num_children=2', '--config.search.tau=2', '--config.search.calibration_batches=1',
          '--config.search.calibration_batch_size=32', '--config.finetune.enabled=False', *extra]


def search_env():
  # One CPU device: the 4 fake devices of the in-process tests would only slow the subprocesses down.
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  return dict(os.environ, XLA_FLAGS=xla_setup.FAST_CPU_FLAGS)


@pytest.mark.slow
def test_killed_search_resumes_to_the_uninterrupted_result(tmp_path):
  full = tmp_path / 'full'
  out = subprocess.run(search_command(full), cwd=ROOT, env=search_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'BOPs' in out.stdout and 'compression' in out.stdout
  # The finished run run again writes nothing (every stage is reused: same files, same modification times).
  listing = lambda d: sorted((str(p.relative_to(d)), p.stat().st_mtime_ns) for p in d.rglob('*'))  # noqa: E731
  before = listing(full)
  out = subprocess.run(search_command(full), cwd=ROOT, env=search_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert listing(full) == before
  # Same baseline and filter properties (deterministic, copied to save time); the search is killed mid-way.
  killed = tmp_path / 'killed'
  killed.mkdir()
  for name in ('baseline', 'baseline.json', 'filter_properties.npz', 'fingerprints.json'):
    src = full / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, killed / name)
  proc = subprocess.Popen(search_command(killed), cwd=ROOT, env=search_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline:  # wait for the initial population and two rounds to be checkpointed
    steps = [int(d) for d in os.listdir(killed / 'search') if d.isdigit()] if (killed / 'search').exists() else []
    if steps and max(steps) >= 10:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / 'search.json').exists()
  out = subprocess.run(search_command(killed), cwd=ROOT, env=search_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'search: resumed after' in out.stderr  # from the checkpoint, not started again
  with np.load(full / 'search_history.npz') as f, np.load(killed / 'search_history.npz') as g:
    for key in ('a', 'b', 'loss', 'flops', 'repeated_plan'):
      np.testing.assert_array_equal(f[key], g[key])
  full_policy, resumed_policy = (policy_lib.read_policy(str(d / 'policy.json')) for d in (full, killed))
  for name, layer in full_policy.layers.items():
    np.testing.assert_array_equal(layer.mask, resumed_policy.layers[name].mask)
    assert (layer.weight_bits, layer.act_bits) == (resumed_policy.layers[name].weight_bits,
                                                   resumed_policy.layers[name].act_bits)
  summary = full_policy.summary
  from configs import demo_mnist5k  # pylint: disable=g-import-not-at-top
  keep = demo_mnist5k.get_config().search.keep_fraction
  assert summary['flops'] <= keep * summary['flops_dense']  # the demo's FLOPs target is met
