"""Tests of DJPQ (picpq_jax/methods/djpq.py, gates.py, dq.py) against hand-worked values, numpy references of the
formulas in BASELINES.md ("DJPQ"), and invariants: bits from (d, q_max), the VIB gate and its KL, the BOPs term
against the cost ledger, the readout and the folded variables, the optimizer groups, and the bad settings.

The models are a five-conv ResNet-like net (`tiny_spec`): a stem, a block with an identity shortcut and one
with an option-A shortcut, so that the stem and both second convs form one chain of widths 4, 4, 8."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, djpq_mnist5k
from picpq_jax import cost, data, dq, gates, models, pipeline, topology as topology_lib, training
from picpq_jax.methods import djpq
from picpq_jax.models.layers import MaskedQConv
from picpq_jax.models.spec import ArchSpec, BlockSpec, ConvSpec, DenseSpec, with_chains


def tiny_spec(size=8):
  convs = [ConvSpec('stem', 1, 4, 3, 1, size, size, None, 32),
           ConvSpec('b1c1', 4, 4, 3, 1, size, size, 'stem', 8),
           ConvSpec('b1c2', 4, 4, 3, 1, size, size, 'b1c1', 8),
           ConvSpec('b2c1', 4, 8, 3, 2, size, size // 2, 'b1c2', 6),
           ConvSpec('b2c2', 8, 8, 3, 1, size // 2, size // 2, 'b2c1', 6)]
  blocks = (BlockSpec('conv', ('stem',)), BlockSpec('basic', ('b1c1', 'b1c2'), shortcut='identity'),
            BlockSpec('basic', ('b2c1', 'b2c2'), shortcut='option_a'))
  links = [('stem', 'b1c2'), ('b1c2', 'b2c2')]
  return ArchSpec('tiny', 3, size, 1, with_chains(convs, links), blocks, (DenseSpec('classifier', 8, 3, 'b2c2'),))


SPEC = tiny_spec()
TOPO = topology_lib.topology_from_spec(SPEC)


def djpq_cfg(**overrides):
  cfg = common.base_config().djpq
  cfg.update(overrides)
  return cfg


def tiny_model(cfg=None, quantized=True):
  cfg = cfg or djpq_cfg()
  return models.Net(SPEC, quantizer='djpq', dq_layers=djpq.quantized_layers(TOPO) if quantized else (),
                    dq_settings=djpq.settings(cfg), gate_threshold=float(cfg.gate_threshold))


def numpy_variables(module, *args, seed=0, init_bits=8):
  """`module`'s variables filled from numpy (compiling init's random initializers on XLA CPU takes seconds):
  He-normal kernels, BatchNorm near identity, gates at their init distribution, DQ steps at their init for
  init_bits from the kernel drawn here."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  rng = np.random.default_rng(seed)
  fill = {'kernel': lambda s: rng.normal(0, math.sqrt(2 / (s[-1] * (s[0] * s[1] if len(s) == 4 else 1))), s),
          'scale': lambda s: 1 + 0.2 * rng.normal(size=s), 'bias': lambda s: 0.2 * rng.normal(size=s),
          'mean': lambda s: 0.2 * rng.normal(size=s), 'var': lambda s: rng.uniform(0.5, 2, s),
          'mu': lambda s: rng.normal(*gates.MU_INIT, s), 'log_sigma2': lambda s: rng.normal(*gates.LOG_SIGMA2_INIT, s)}
  flat = {k: v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items()}
  out = {k: np.asarray(fill[k[-1]](v.shape), np.float32) for k, v in flat.items() if k[-1] in fill}
  for k in flat:
    if k[-1] == 'w_step':
      step, qmax = dq.init_weight_grid(out[k[:-1] + ('kernel',)], init_bits)
      out[k], out[k[:-1] + ('w_range',)] = np.float32(step), np.float32(qmax)
    elif k[-1] == 'a_step':
      step, qmax = dq.init_act_grid(init_bits)
      out[k], out[k[:-1] + ('a_range',)] = np.float32(step), np.float32(qmax)
  assert set(out) == set(flat)
  return flax.traverse_util.unflatten_dict(out)


def tiny_variables(model, seed=0):
  return numpy_variables(model, np.zeros((1, 8, 8, 1), np.float32), seed=seed)


def images(n, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 1)), jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# DQ: bits from (d, q_max), the quantizer, its init, box and restrict variant
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('step,qmax,w_bits,a_bits', [
    (2.0 ** -3, 0.875, 4, 3),  # the example: q/d = 7, log2(8) = 3
    (0.1, 0.3, 3, 2),  # q/d = 3: log2(4) = 2
    (0.25, 1.0, 4, 3),  # q/d = 4: log2(5) = 2.32 -> 3
    (2.0 ** -8, 2.0 ** -8 * 127, 8, 7),  # the init for 8 weight bits
    (0.5, 0.5, 2, 1),  # q = d: the ternary weight grid {-d, 0, d}
])
def test_bits_readout_is_the_formula_on_hand_worked_values(step, qmax, w_bits, a_bits):
  w = dq.grid(step, qmax, signed=True)
  a = dq.grid(step, qmax, signed=False)
  assert float(w.bits) == w_bits and float(a.bits) == a_bits
  assert float(w.step) == np.float32(step) and float(w.qmax) == np.float32(qmax)


def test_bits_match_a_numpy_reference():
  rng = np.random.default_rng(0)
  step = 2.0 ** rng.uniform(-8, 0, 2000)
  qmax = step * rng.uniform(0.5, 300, 2000)
  exact = np.log2(qmax / step + 1.0)
  far = np.abs(exact - np.round(exact)) > 1e-3  # away from the integers, where float32 could round across
  want_w = np.ceil(exact) + 1
  got_w = np.asarray(dq.derived_bits(jnp.asarray(step, jnp.float32), jnp.asarray(qmax, jnp.float32), True))
  got_a = np.asarray(dq.derived_bits(jnp.asarray(step, jnp.float32), jnp.asarray(qmax, jnp.float32), False))
  assert far.sum() > 1900
  np.testing.assert_array_equal(got_w[far], want_w[far])
  np.testing.assert_array_equal(got_a[far], want_w[far] - 1)


def test_quantizer_matches_numpy_and_its_gradients_are_the_dq_papers():
  x = jnp.array([-1.3, -0.61, -0.2, 0.0, 0.07, 0.33, 0.74, 2.0], jnp.float32)
  step, qmax = 0.25, 0.9
  c = np.clip(np.asarray(x, np.float64), -qmax, qmax)
  np.testing.assert_allclose(dq.quantize(x, step, qmax, signed=True), step * np.round(c / step), atol=1e-7)
  np.testing.assert_allclose(dq.quantize(x, step, qmax, signed=False),
                             step * np.round(np.clip(np.asarray(x, np.float64), 0, qmax) / step), atol=1e-7)
  g_x, g_d, g_q = jax.grad(lambda x, d, q: jnp.sum(dq.quantize(x, d, q, signed=True)), argnums=(0, 1, 2))(
      x, step, qmax)
  inside = np.abs(np.asarray(x)) < qmax
  np.testing.assert_array_equal(g_x, inside.astype(np.float32))  # round straight-through, clip true
  assert abs(float(g_d) - np.sum(np.round(c / step) - c / step)) < 1e-5  # d(d round(c/d))/dd
  assert float(g_q) == np.sum(np.sign(np.asarray(x))[~inside])  # 2.0 counts +1, -1.3 counts -1


@pytest.mark.parametrize('bits', [2, 3, 4, 6, 8])
def test_init_gives_exactly_the_init_bits(bits):
  kernel = jnp.asarray(np.random.default_rng(bits).normal(0, 0.1, (3, 3, 8, 8)), jnp.float32)
  step, qmax = dq.init_weight_grid(kernel, bits)
  assert math.log2(float(step)) == round(math.log2(float(step)))  # a power of two
  assert float(qmax) >= float(jnp.max(jnp.abs(kernel)))  # nothing of the baseline kernel is clipped
  assert float(dq.grid(step, qmax, signed=True).bits) == bits
  a_step, a_qmax = dq.init_act_grid(bits)
  assert float(a_step) == 0.125 and float(dq.grid(a_step, a_qmax, signed=False).bits) == bits


def test_project_keeps_steps_and_bits_in_the_box():
  rng = np.random.default_rng(1)
  step = jnp.asarray(10.0 ** rng.uniform(-4, 1, 500), jnp.float32)
  qmax = jnp.asarray(10.0 ** rng.uniform(-4, 3, 500), jnp.float32)
  for signed in (True, False):
    d, q = dq.project(step, qmax, signed=signed, min_bits=2, max_bits=8)
    bits = np.asarray(dq.derived_bits(d, q, signed))
    assert np.all((np.asarray(d) >= 2.0 ** -8) & (np.asarray(d) <= 1.0))
    assert bits.min() == 2 and bits.max() == 8  # both ends are reached by these draws, and not passed


@pytest.mark.parametrize('ratio,derived,snapped', [(3.0, 3, 4), (1.0, 2, 2), (7.0, 4, 4), (20.0, 6, 8)])
def test_restrict_snaps_bits_up_to_a_power_of_two_and_recomputes_the_step(ratio, derived, snapped):
  step, qmax = 0.01, 0.01 * ratio
  assert float(dq.grid(step, qmax, signed=True).bits) == derived
  g = dq.grid(step, qmax, signed=True, restrict=True)
  assert float(g.bits) == snapped
  assert abs(float(g.step) - qmax / (2 ** (snapped - 1) - 1)) <= 1e-9  # the grid fills the snapped bits
  assert float(dq.grid(g.step, g.qmax, signed=True).bits) == snapped  # and derives those bits again


def test_restrict_is_a_config_option_that_gives_powers_of_two_in_the_readout():
  cfg = djpq_cfg(restrict=True)
  model = tiny_model(cfg)
  v = tiny_variables(model)
  v['params']['b1c1']['w_range'] = v['params']['b1c1']['w_step'] * np.float32(3.0)  # 3 bits, snapped to 4
  v['params']['b2c1']['a_range'] = v['params']['b2c1']['a_step'] * np.float32(20.0)  # 5 bits, snapped to 8
  w, a = djpq.layer_bits(v['params'], model, TOPO)
  quantized = np.array([n in model.dq_layers for n in TOPO.names])
  assert set(np.asarray(w)[quantized].tolist()) | set(np.asarray(a)[quantized].tolist()) <= {2.0, 4.0, 8.0}
  assert float(w[TOPO.index('b1c1')]) == 4 and float(a[TOPO.index('b2c1')]) == 8
  grid = djpq.layer_grids(v['params'], model)['b1c1'][0]
  assert abs(float(grid.step) - float(v['params']['b1c1']['w_range']) / 7) <= 1e-7  # d recomputed from q_max


# ----------------------------------------------------------------------------------------------------------
# The VIB gate
# ----------------------------------------------------------------------------------------------------------


def test_kl_is_the_formula_and_its_gradient_pushes_mu_towards_zero():
  mu = jnp.array([-2.0, -0.3, 0.05, 0.7, 1.5])
  log_sigma2 = jnp.log(jnp.array([0.25, 0.01, 1.0, 4.0, 1e-4]))
  h, w = 8, 8
  sigma2 = np.exp(np.asarray(log_sigma2, np.float64))
  mu64 = np.asarray(mu, np.float64)
  want = 0.5 * (1 / h) * h * w * np.sum(np.log1p(mu64 ** 2 / (sigma2 + 1e-8)))
  assert abs(float(gates.kl_divergence(mu, log_sigma2, h, w)) - want) <= 1e-5 * want
  g_mu, g_ls = jax.grad(lambda m, s: gates.kl_divergence(m, s, h, w), argnums=(0, 1))(mu, log_sigma2)
  np.testing.assert_array_equal(np.sign(g_mu), np.sign(mu))  # descent shrinks |mu|
  np.testing.assert_allclose(g_mu, 0.5 * w * 2 * mu64 / (sigma2 + 1e-8 + mu64 ** 2), rtol=1e-5)
  assert np.all(np.asarray(g_ls) < 0)  # and grows the noise


def test_keep_mask_prunes_where_log_alpha_reaches_the_threshold_and_keeps_one_per_member():
  mu = jnp.array([1.0, 1e-3, 0.5, -2.0])
  log_sigma2 = jnp.array([-9.0, -9.0, 0.0, -1.0])
  # log alpha = -9, -9 + 13.8, 0 + 1.39, -1 - 1.39
  np.testing.assert_array_equal(gates.keep_mask(mu, log_sigma2), [True, False, False, True])
  np.testing.assert_array_equal(gates.keep_mask(mu, log_sigma2, threshold=2.0), [True, False, True, True])
  # every channel pruned: each member prefix keeps its channel of smallest log alpha
  dead = jnp.array([3.0, 1.0, 2.0, 0.5])
  np.testing.assert_array_equal(gates.keep_mask(jnp.ones(4), dead, member_widths=(2, 4)), [False, True, False, False])
  np.testing.assert_array_equal(gates.keep_mask(jnp.ones(4), dead, member_widths=(1, 4)), [True, False, False, False])


def test_test_time_output_is_zero_on_pruned_channels_and_mu_scaled_elsewhere():
  conv = SPEC.conv('b1c1')
  unit = MaskedQConv(conv, quantizer='djpq')
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
  v = numpy_variables(unit, x, False)
  mu = jnp.array([0.8, 1e-3, -1.2, 0.4])  # channel 1 pruned (log alpha = -9 + 13.8)
  z = gates.deterministic(mu, jnp.full(4, -9.0))
  apply = jax.jit(lambda v, x, mask: unit.apply(v, x, False, mask=mask))
  y = apply(v, x, z)
  plain = apply(v, x, jnp.ones(4))
  assert np.all(np.asarray(y[..., 1]) == 0.0) and np.any(np.asarray(plain[..., 1]) != 0)
  for j in (0, 2, 3):
    np.testing.assert_array_equal(y[..., j], plain[..., j] * mu[j])


def test_training_gates_draw_noise_per_example_and_channel():
  mu, log_sigma2 = jnp.array([1.0, 0.5, -0.2]), jnp.log(jnp.array([0.04, 0.25, 1.0]))
  eps = np.random.default_rng(2).normal(size=(20000, 3)).astype(np.float32)
  z = np.asarray(gates.sample(mu, log_sigma2, eps))
  np.testing.assert_allclose(z.mean(0), mu, atol=0.03)
  np.testing.assert_allclose(z.std(0), [0.2, 0.5, 1.0], rtol=0.03)
  assert abs(np.corrcoef(z.T)[0, 1]) < 0.03  # channels draw independently
  gate = gates.VIBGate(3)
  params = {'params': {'mu': mu, 'log_sigma2': log_sigma2}}
  batch = np.asarray(gate.apply(params, 4, True, rngs={gates.RNG: jax.random.key(3)}))
  assert batch.shape == (4, 3) and len(np.unique(batch)) == 12  # one draw per example and channel
  # at test: log alpha = -3.2, 0 (+4e-8 from the 1e-8), 3.2: mu where it is below 0, else 0
  np.testing.assert_array_equal(gate.apply(params, 4, False), [1.0, 0.0, 0.0])


def test_chain_members_get_one_mask():
  groups = gates.groups(TOPO.layers)
  assert [(g.name, g.width, g.members) for g in groups] == [
      ('gate_stem', 8, (('stem', 4), ('b1c2', 4), ('b2c2', 8))), ('gate_b1c1', 4, (('b1c1', 4),)),
      ('gate_b2c1', 8, (('b2c1', 8),))]
  model = tiny_model()
  v = tiny_variables(model)
  v['params']['gate_stem']['mu'] = np.array([1.0, 1e-3, 0.6, 0.9, 1e-3, 1.1, 0.8, 1e-3], np.float32)
  v['params']['gate_stem']['log_sigma2'] = np.full(8, -9.0, np.float32)

  class Probe(flax.linen.Module):  # the masks Net hands its units, in training and at test
    @flax.linen.compact
    def __call__(self, train):
      return gates.gate_masks(groups, 5, train, 0.0)

  probe = {'params': {g.name: v['params'][g.name] for g in groups}}
  apply = jax.jit(lambda p, key: (Probe().apply(p, False), Probe().apply(p, True, rngs={gates.RNG: key})))
  for m in apply(probe, jax.random.key(3)):  # at test, in training
    np.testing.assert_array_equal(m['stem'], m['b2c2'][..., :4])
    np.testing.assert_array_equal(m['b1c2'], m['b2c2'][..., :4])
  z = djpq.gate_values(v['params'], TOPO, 0.0)  # what the readout's masks are made of
  np.testing.assert_array_equal(z['b2c2'] != 0, [1, 0, 1, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(z['stem'], z['b2c2'][:4])
  np.testing.assert_array_equal(z['b1c2'], z['b2c2'][:4])


def test_kept_surrogate_is_hard_forward_and_sigmoid_backward():
  mu, log_sigma2 = jnp.array([1.0, 0.2, 1e-3]), jnp.array([-9.0, -4.0, -9.0])  # log alpha -9, -0.78, 4.8
  s = gates.kept_surrogate(mu, log_sigma2, 0.0, 2.0)
  np.testing.assert_array_equal(s, [1.0, 1.0, 0.0])
  la = gates.log_alpha(mu, log_sigma2)
  g = jax.grad(lambda ls: jnp.sum(gates.kept_surrogate(mu, ls, 0.0, 2.0)))(log_sigma2)
  sig = jax.nn.sigmoid(-la / 2.0)
  np.testing.assert_allclose(g, -sig * (1 - sig) / 2.0, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The loss: BOPs from the ledger, its gradients; the readout
# ----------------------------------------------------------------------------------------------------------

# MACs of the tiny net: stem 8*8*9*1*4 = 2304, b1c1 and b1c2 8*8*9*4*4 = 9216, b2c1 4*4*9*4*8 = 4608,
# b2c2 4*4*9*8*8 = 9216, classifier 8*3 = 24.
DENSE_BOPS = (2304 + 9216 + 9216 + 4608 + 9216 + 24) * 32 * 32
INIT_BOPS = (2304 + 24) * 32 * 32 + (9216 + 9216 + 4608 + 9216) * 8 * 8  # the stem and classifier stay 32-bit
# One channel per layer at 2 bits: stem 8*8*9*1*1 at 32 x 32; b1c1, b1c2 8*8*9; b2c1, b2c2 4*4*9 at 2 x 2.
FLOOR_BOPS = 576 * 1024 + (576 + 576 + 144 + 144) * 4 + 1 * 3 * 1024


def test_bops_term_is_the_ledgers_and_differentiable_through_the_surrogates():
  model = tiny_model()
  v = tiny_variables(model)
  assert float(djpq.bops(v['params'], model, TOPO, 0.0, 1.0)) == INIT_BOPS
  assert djpq.dense_bops(TOPO) == DENSE_BOPS
  assert abs(djpq.max_bops_ratio(TOPO, 2) - DENSE_BOPS / FLOOR_BOPS) <= 1e-9 * DENSE_BOPS / FLOOR_BOPS
  g = jax.jit(jax.grad(lambda p: djpq.bops(p, model, TOPO, 0.0, 1.0)))(v['params'])
  for name in djpq.quantized_layers(TOPO):
    assert float(g[name]['w_step']) < 0 and float(g[name]['a_step']) < 0  # a coarser step: fewer bits
    assert float(g[name]['w_range']) > 0 and float(g[name]['a_range']) > 0  # a wider range: more bits
  for group in gates.groups(TOPO.layers):
    assert np.all(np.asarray(g[group.name]['log_sigma2']) < 0)  # more noise: fewer kept channels
  # What the surrogate's gradient is multiplied by: d BOPs / d kept channels of a layer, its own MACs per
  # output channel at its bits plus those of its consumers per input channel (the ledger's formula, by hand).
  w, a = djpq.layer_bits(v['params'], model, TOPO)
  d_keep = jax.grad(lambda k: cost.bops(TOPO, k, w, a))(jnp.asarray(TOPO.out_channels, jnp.float32))
  np.testing.assert_array_equal(d_keep, [
      64 * 9 * 1 * 1024 + 64 * 9 * 4 * 64,  # stem (32 x 32 bits); b1c1 reads it
      64 * 9 * 4 * 64 + 64 * 9 * 4 * 64,  # b1c1; b1c2 reads it
      64 * 9 * 4 * 64 + 16 * 9 * 8 * 64,  # b1c2; b2c1 reads it
      16 * 9 * 4 * 64 + 16 * 9 * 8 * 64,  # b2c1; b2c2 reads it
      16 * 9 * 8 * 64 + 3 * 1024])  # b2c2; the classifier reads it


STEPS = 4


@pytest.fixture(scope='module')
def trained():
  """STEPS jitted DJPQ train steps of the tiny net on random images; the schedule reaches 0 at the last step,
  which therefore changes no parameter: its loss terms are those of the final parameters. Adam at 0.05 on the
  steps, 0.5 on the gates, a strong beta and a far target: bits and channels fall within the few steps."""
  cfg = djpq_cfg(epochs=1, beta=1e4, target_bops_ratio=40.0)
  cfg.groups.quantizer.learning_rate = 0.05
  cfg.groups.gates.learning_rate = 0.5
  model = tiny_model(cfg)
  v = tiny_variables(model)
  tx = djpq.make_optimizer(cfg, training.make_schedule(cfg, STEPS - 1))
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=v['params'], batch_stats=v['batch_stats'],
                              opt_state=tx.init(v['params']))
  step = jax.jit(djpq.make_train_step(model, TOPO, cfg, tx))
  labels = np.random.default_rng(0).integers(0, 3, (STEPS, 8))
  metrics, params = [], []
  for i in range(STEPS):
    params.append(jax.device_get(state.params))
    state, m = step(state, {'image': images(8, i), 'label': jnp.asarray(labels[i], jnp.int32)}, jax.random.key(6))
    metrics.append(jax.device_get(m))
  return {'cfg': cfg, 'model': model, 'metrics': metrics, 'params': params,
          'variables': jax.device_get(state.variables)}


def test_loss_is_cross_entropy_plus_gamma_kl_plus_beta_bops_term(trained):
  cfg, first = trained['cfg'], trained['metrics'][0]  # at the initial parameters
  assert float(first['bops']) == INIT_BOPS
  ratio = INIT_BOPS / DENSE_BOPS
  assert abs(float(first['bops_ratio']) - ratio) < 1e-7
  assert abs(float(first['bops_penalty']) - max(ratio - 1 / cfg.target_bops_ratio, 0) ** 2) < 1e-7
  want = float(first['cross_entropy']) + cfg.gamma * float(first['kl']) + cfg.beta * float(first['bops_penalty'])
  assert abs(float(first['loss']) - want) <= 1e-5 * want
  assert abs(float(first['kl']) - float(djpq.kl_penalty(trained['params'][0], TOPO))) <= 1e-5 * float(first['kl'])


def test_readout_bops_equal_the_loss_terms_forward_value_at_the_end_of_training(trained):
  cfg, model, v = trained['cfg'], trained['model'], trained['variables']
  unchanged = jax.tree.map(np.array_equal, trained["params"][-1], v["params"])
  assert all(jax.tree.leaves(unchanged))  # the last step (learning rate 0) left every parameter as it was
  policy, summary, _ = djpq.readout(model, TOPO, v, cfg, 'tiny', 'none')
  ledger = cost.ledger(TOPO, policy)
  last = float(trained['metrics'][-1]['bops'])  # the loss term's forward value in the last step
  assert last == ledger['bops'] == summary['bops_loss_term']['bops']
  assert ledger['bops'] < 0.9 * INIT_BOPS  # training moved it: the equality is not the init's
  assert min(policy.layers[n].weight_bits for n in djpq.quantized_layers(TOPO)) < 8
  for name in djpq.quantized_layers(TOPO):
    layer = policy.layers[name]
    assert 2 <= layer.weight_bits <= 8 and 2 <= layer.act_bits <= 8
    assert layer.quantizer['name'] == 'picpq' and layer.quantizer['dq_weight_step'] > 0
  assert policy.layers['stem'].weight_bits == policy.layers['stem'].act_bits == 32
  assert summary['layers']['b2c2']['kept'] == int(policy.masks['b2c2'].sum())
  np.testing.assert_array_equal(policy.masks['stem'], policy.masks['b2c2'][:4])  # one chain, one mask


def test_folded_variables_run_the_gated_model_in_the_plain_net():
  model = tiny_model(quantized=False)  # no DQ: the gates and their fold alone
  v = tiny_variables(model, seed=1)
  v['params']['gate_stem']['mu'] = np.array([0.7, 1e-3, -1.3, 1.1, 0.9, 1e-3, 2.0, 0.5], np.float32)
  v['params']['gate_b2c1']['mu'] = np.array([1e-3, 0.6, 1.4, -0.9, 1e-3, 1.0, 0.8, 1.2], np.float32)
  policy, _, folded = djpq.readout(model, TOPO, v, djpq_cfg(), 'tiny', 'none')
  assert int(policy.masks['b2c1'].sum()) == 6 and int(policy.masks['b2c2'].sum()) == 6
  assert not any(k.startswith('gate_') for k in folded['params'])
  assert 'w_step' not in folded['params']['b1c1']
  x = images(3, seed=8)
  gated = jax.jit(model.apply)(v, x)
  plain = jax.jit(models.Net(SPEC).apply)(folded, x, masks=policy.masks)
  np.testing.assert_allclose(plain, gated, rtol=1e-5, atol=1e-5)


def test_three_optimizer_groups_weights_by_sgd_gates_and_steps_by_adam():
  cfg = djpq_cfg()
  model = tiny_model(cfg)
  params = tiny_variables(model)['params']
  labels = training.group_labels(cfg.groups)(params)
  assert labels['gate_stem'] == {'mu': 'gates', 'log_sigma2': 'gates'}
  assert labels['b1c1']['w_step'] == labels['b1c1']['a_range'] == 'quantizer'
  assert labels['b1c1']['kernel'] == labels['classifier']['bias'] == 'weights'
  tx = djpq.make_optimizer(cfg, lambda step: cfg.learning_rate)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * g / (|g| + eps): the group's learning rate; Nesterov SGD's is
  # lr (1 + momentum) (g + wd p) (the trace starts at g + wd p, and Nesterov adds momentum times it).
  np.testing.assert_allclose(updates["gate_stem"]["mu"], -cfg.groups.gates.learning_rate, rtol=1e-5)
  np.testing.assert_allclose(updates["b1c1"]["w_step"], -cfg.groups.quantizer.learning_rate, rtol=1e-5)
  k = params['b1c1']['kernel']
  sgd = -cfg.learning_rate * (1 + cfg.momentum) * (0.3 + cfg.weight_decay * k)
  assert cfg.nesterov and cfg.groups.weights.optimizer == 'sgd'
  np.testing.assert_allclose(updates['b1c1']['kernel'], sgd, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


def demo_topology(config):
  spec = data.DATASETS[config.data.name]
  info = data.DatasetInfo(config.data.name, spec.num_classes, config.data.image_size, spec.in_channels, 1, 1, 1)
  return pipeline.build_topology(config, info)


def test_demo_config_passes_and_its_target_is_reachable():
  config = djpq_mnist5k.get_config()
  assert config.method.name == 'djpq'
  topo = demo_topology(config)
  djpq.check_config(config, topo)
  assert djpq.max_bops_ratio(topo, config.djpq.min_bits) > config.djpq.target_bops_ratio


@pytest.mark.parametrize('key,value,needle', [
    ('target_bops_ratio', 1e6, 'cannot be reached'),
    ('target_bops_ratio', 0.5, 'must be a finite number > 1'),
    ('gamma', -1e-5, 'must be a finite number >= 0'),
    ('beta', -1.0, 'must be a finite number >= 0'),
    ('beta', float('nan'), 'must be a finite number >= 0'),
    ('gate_threshold', float('inf'), 'must be a finite number'),
    ('gate_threshold', float('nan'), 'must be a finite number'),
    ('surrogate_temperature', 0.0, '> 0'),
    ('min_bits', 1, 'djpq.min_bits'),
    ('init_bits', 9, 'djpq.init_bits'),
    ('max_bits', 17, 'djpq.max_bits'),
    ('epochs', 0, 'djpq.epochs'),
    ('groups.gates.learning_rate', -1e-3, 'djpq.groups.gates.learning_rate'),
    ('groups.quantizer.optimizer', 'adam', 'djpq.groups.quantizer.optimizer'),
])
def test_check_config_rejects_bad_settings_in_one_sentence_naming_the_key(key, value, needle):
  config = djpq_mnist5k.get_config()
  topo = demo_topology(config)
  node = config.djpq
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=r'djpq\.' + key.split('.')[0]) as e:
    djpq.check_config(config, topo)
  message = str(e.value)
  assert needle in message and '\n' not in message and message.endswith('.')


def test_restrict_needs_a_power_of_two_max_bits():
  config = djpq_mnist5k.get_config()
  config.djpq.restrict = True
  config.djpq.max_bits = 6
  with pytest.raises(ValueError, match=r'djpq\.max_bits=6 must be a power of two'):
    djpq.check_config(config, None)
  config.djpq.max_bits = 8
  djpq.check_config(config, None)
