"""OPQ-style allocation (picpq_jax/methods/opq.py): known answers on Laplace weights, the bit budget, the codes,
the BatchNorm fold of the channel scales, frozen pruned weights, bad budgets."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import opq_mnist5k
from picpq_jax import export, models, pipeline, quant, testing, topology, training
from picpq_jax import policy as policy_lib
from picpq_jax.methods import opq

ARCH, CLASSES, SIZE, CHANNELS = 'resnet20', 10, 28, 1


@dataclasses.dataclass
class Info:
  num_classes: int = CLASSES
  image_size: int = SIZE
  in_channels: int = CHANNELS
  name: str = 'mnist5k'


@pytest.fixture(scope='module')
def net():
  spec = models.get_spec(ARCH, CLASSES, SIZE, CHANNELS)
  topo = topology.get_topology(ARCH, CLASSES, SIZE, CHANNELS)
  return spec, topo, testing.random_variables(spec, seed=1)


def laplace_params(topo, variables, seed=0):
  """The params with every allocated kernel's |W| on the stratified quantiles of Exp(b_l) (so its empirical
  distribution is Laplace(0, b_l) up to 1/n), random signs and order; b_l differs per layer."""
  rng = np.random.default_rng(seed)
  params = {k: dict(v) for k, v in variables['params'].items()}
  scales = {}
  for i, l in enumerate(opq.allocated_layers(topo)):
    shape = np.shape(params[l.name]['kernel'])
    n = int(np.prod(shape))
    b = 0.02 * (1.0 + 0.37 * i)
    magnitude = -b * np.log1p(-(np.arange(n) + 0.5) / n)  # Exp(b) quantiles
    w = rng.permutation(magnitude) * rng.choice([-1.0, 1.0], n)
    params[l.name]['kernel'] = w.reshape(shape).astype(np.float32)
    scales[l.name] = b
  return params, scales


@pytest.mark.parametrize('sparsity', [0.3, 0.75])
def test_laplace_sparsity_known_answer(net, sparsity):
  _, topo, variables = net
  params, b = laplace_params(topo, variables)
  a = opq.allocate(topo, params, sparsity, 4)
  counts = np.array([np.size(params[n]['kernel']) for n in a.layers], np.float64)
  for name, layer in a.layers.items():
    # The fitted scale is the true one; the mask's sparsity is the model's p_l = 1 - exp(-t / b_l).
    assert layer.laplace_b == pytest.approx(b[name], rel=2e-3)
    assert layer.analytic_sparsity == pytest.approx(1 - np.exp(-a.threshold / layer.laplace_b), abs=1e-12)
    assert abs(layer.sparsity - layer.analytic_sparsity) < 0.01, name
    assert np.array_equal(layer.weight_mask, np.abs(params[name]['kernel']) >= a.threshold)
  analytic = np.array([l.analytic_sparsity for l in a.layers.values()])
  assert np.dot(counts, analytic) / counts.sum() == pytest.approx(sparsity, abs=1e-9)
  assert abs(a.sparsity - sparsity) < 0.005
  # One threshold: wider layers keep more, so the layers' ratios differ.
  assert analytic.max() - analytic.min() > 0.2


@pytest.mark.parametrize('avg_bits', [2.5, 4, 6.3])
def test_bit_bisection_meets_budget_tightest(net, avg_bits):
  _, topo, variables = net
  params, _ = laplace_params(topo, variables)
  a = opq.allocate(topo, params, 0.6, avg_bits)
  ranges = np.array([l.range for l in a.layers.values()])
  survivors = np.array([l.weight_mask.sum() for l in a.layers.values()])
  bits = np.array([l.bits for l in a.layers.values()])
  assert a.avg_bits <= avg_bits
  assert a.avg_bits == pytest.approx(np.dot(survivors, bits) / survivors.sum())
  # Tightest: any smaller global step exceeds the budget.
  assert opq.average_bits(ranges, survivors, a.global_step * (1 - 1e-9)) > avg_bits
  expect = np.clip(np.ceil(np.log2(2 * ranges / a.global_step + 1)), opq.MIN_BITS, opq.MAX_BITS)
  np.testing.assert_array_equal(bits, expect)
  assert len(set(bits.tolist())) > 1  # layers of different ranges get different bits


def test_codes_are_integers_in_range(net):
  _, topo, variables = net
  params, _ = laplace_params(topo, variables)
  a = opq.allocate(topo, params, 0.7, 3.5)
  for name, layer in a.layers.items():
    kernel = jnp.asarray(params[name]['kernel'])
    codes, channel_step = quant.opq_codes(kernel, layer.step, layer.scales, layer.bits)
    codes = np.asarray(codes)
    q = 2 ** (layer.bits - 1) - 1
    assert np.array_equal(codes, np.round(codes)) and np.abs(codes).max() <= q
    # The survivors need no clipping: their scaled magnitude is within half a step of the top level.
    survivors = np.abs(np.asarray(kernel) * layer.weight_mask) / (layer.scales * layer.step)
    assert survivors.max() <= q + 0.5 + 1e-4
    np.testing.assert_allclose(np.asarray(quant.opq_quant(kernel, layer.step, layer.scales, layer.bits)),
                               codes * np.asarray(channel_step), rtol=1e-6)
    assert np.max(layer.scales) == pytest.approx(layer.range, rel=1e-6)


def _policy(topo, params, sparsity=0.7, avg_bits=4, act_bits=32):
  a = opq.allocate(topo, params, sparsity, avg_bits)
  return opq.to_policy(a, topo, ARCH, 'mnist5k', act_bits)


def test_policy_json_round_trip_and_model_arguments(net, tmp_path):
  _, topo, variables = net
  policy = _policy(topo, variables['params'])
  policy_lib.write_policy(str(tmp_path), policy)
  again = policy_lib.read_policy(str(tmp_path / policy_lib.POLICY_FILE), ARCH)
  assert opq.grids(again) == opq.grids(policy)
  args = policy_lib.model_arguments(again)
  assert set(args['weight_masks']) == {l.name for l in opq.allocated_layers(topo)}
  for name, m in args['weight_masks'].items():
    np.testing.assert_array_equal(m, policy.layers[name].weight_mask)
  # A policy whose quantizers do not ask for enforcement (e.g. CoDeQ's) gives exactly masks and bits.
  plain = policy_lib.from_masks_and_bits(ARCH, 'mnist5k', 'codeq', {}, {'layer1_0_conv1': 4},
                                         weight_masks=policy.weight_masks)
  assert set(policy_lib.model_arguments(plain)) == {'masks', 'bits'}


@pytest.mark.parametrize('fold_bn', [False, True])
def test_export_folds_channel_scales_into_batchnorm(net, tmp_path, fold_bn):
  spec, topo, variables = net
  policy = _policy(topo, variables['params'])
  model = opq.opq_model(ARCH, Info(), policy)
  v = opq.masked_variables(variables, policy)
  bits = {name: (l.weight_bits, l.act_bits) for name, l in policy.layers.items()}
  path = str(tmp_path / 'model.npz')
  export.export_model(path, spec, v, policy.masks, bits, fold_bn=fold_bn, quantizers=policy.quantizer_parameters)
  x = np.random.default_rng(0).uniform(0, 1, (8, SIZE, SIZE, CHANNELS)).astype(np.float32)
  args = policy_lib.model_arguments(policy)
  want = np.asarray(model.apply(v, x, **args))
  diff = export.logit_difference(path, spec, v, policy.masks, bits, x, model=model)
  assert diff.max() < 1e-4 * max(1.0, np.abs(want).max()), diff
  manifest, _ = export.read_export(path)
  entries = {l['name']: l for l in manifest['layers']}
  for name, l in policy.layers.items():
    if l.quantizer['name'] == 'opq':
      assert entries[name]['quantizer'] == 'opq' and entries[name]['weight_bits'] == l.weight_bits
  # Without the weight masks the model gives the same logits: the pruned weights are exactly 0.
  np.testing.assert_array_equal(want, np.asarray(model.apply(v, x, masks=args['masks'], bits=args['bits'])))


def test_finetuning_keeps_pruned_weights_at_zero(net):
  _, topo, variables = net
  policy = _policy(topo, variables['params'])
  model = opq.opq_model(ARCH, Info(), policy)
  v = opq.masked_variables(variables, policy)
  args = policy_lib.model_arguments(policy)
  cfg = opq_mnist5k.get_config().finetune
  tx = training.make_optimizer(cfg, optax.constant_schedule(0.05))
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=v['params'], batch_stats=v['batch_stats'],
                              opt_state=tx.init(v['params']))
  step = jax.jit(training.make_train_step(model, tx))
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {'image': rng.uniform(0, 1, (8, SIZE, SIZE, CHANNELS)).astype(np.float32),
             'label': rng.integers(0, CLASSES, 8)}
    state, metrics = step(state, batch, args['masks'], args['bits'], None, args['weight_masks'])
  assert np.isfinite(float(metrics['loss']))
  for name, mask in policy.weight_masks.items():
    kernel = np.asarray(state.params[name]['kernel'])
    assert np.all(kernel[mask == 0] == 0), name
    assert not np.allclose(kernel[mask == 1], v['params'][name]['kernel'][mask == 1])


@pytest.mark.parametrize('key,value', [('sparsity', 1.0), ('sparsity', -0.1), ('avg_bits', 0.5),
                                       ('avg_bits', 17), ('avg_bits', 1.5)])
def test_bad_budgets_one_sentence(key, value):
  config = opq_mnist5k.get_config()
  config.opq[key] = value
  with pytest.raises(ValueError, match=rf'^opq\.{key}='):
    pipeline.check_config(config)


def test_no_budget_prunes_nothing(net):
  _, topo, variables = net
  a = opq.allocate(topo, variables['params'], 0.0, 8)
  assert a.threshold == 0 and a.sparsity == 0
  assert all(l.weight_mask.all() for l in a.layers.values())
  assert a.avg_bits <= 8
