"""Tests of CoDeQ's dead-zone quantizer (picpq_jax/methods/codeq.py) against answers worked out by hand and a
numpy reference of the official formulas (BASELINES.md, "CoDeQ"), independent of the module's code."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.methods import codeq

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: one ulp of 1.0


def ulps(x, n=1):
  """n float32 ulps of |x| (the spacing at x's binade)."""
  return n * float(np.spacing(np.float32(abs(x))))


def random_kernel(shape=(3, 3, 16, 32), seed=0, scale=0.05):
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
  return jnp.asarray(w)


def test_hand_worked_three_bit_example():
  w = np.array([0.05, -0.2, 0.3, -0.45, 0.6, -1.0, 1.5], np.float32)
  theta_dz = math.atanh(0.75)  # |tanh| = 3/4: d = 2A / 4
  theta_b = -0.17  # 6 |tanh(-0.17)| + 2 = 3.0103 -> B = 3 (the sign is dropped by |.|)
  # A: sorted |W| = .05 .2 .3 .45 .6 1.0 1.5; index 0.99 * 6 = 5.94 -> 1.0 + 0.94 * (1.5 - 1.0).
  top = 1.47
  bits, levels = 3, 3  # Q = 2^2 - 1
  dead_zone = 2 * top * (1 - 0.75)  # 0.735
  step = (top - dead_zone / 2) / (levels - 0.5) + 1e-8  # 0.441
  shift = dead_zone / 2 - step / 2  # 0.147
  # |W| - sh, / s: .05, .2, .3 fall below d/2 = 0.3675 -> 0; .45 -> 0.69 -> 1; .6 -> 1.03 -> 1; 1.0 -> 1.93 -> 2;
  # 1.5 -> 3.07 -> 3 (= Q).
  codes = np.array([0, 0, 0, -1, 1, -2, 3])
  w_hat = np.array([0, 0, 0, -(step + shift), step + shift, -(2 * step + shift), 3 * step + shift])
  assert math.isclose(3 * step + shift, top, abs_tol=1e-7)  # the top level is A (+ 2.5e-8 from the 1e-8)

  got = codeq.deadzone_params(jnp.asarray(w), theta_dz, theta_b)
  tol = 16 * top * EPS32  # tanh's and the quantile's rounding, carried through a few operations
  assert int(got['bits']) == bits and got['bits'].dtype == jnp.int32
  for name, want in [('top', top), ('dead_zone', dead_zone), ('step', step), ('shift', shift)]:
    assert abs(float(got[name]) - want) <= tol, name
  q, s, sh = codeq.deadzone_codes(jnp.asarray(w), theta_dz, theta_b)
  np.testing.assert_array_equal(q, codes)
  assert q.dtype == jnp.int32
  np.testing.assert_allclose(codeq.deadzone_quant(jnp.asarray(w), theta_dz, theta_b), w_hat, rtol=0, atol=tol)


def numpy_codes(w, step, shift, levels):
  """The official q = clip(round(sign(W) relu(|W| - sh) / s), -Q, Q), in float32 numpy."""
  w = np.asarray(w, np.float32)
  step, shift, levels = np.float32(step), np.float32(shift), np.float32(levels)
  return np.clip(np.round(np.sign(w) * np.maximum(np.abs(w) - shift, np.float32(0)) / step), -levels, levels)


@pytest.mark.parametrize('theta_dz,theta_b,fixed_bits', [
    (3.0, 3.0, None), (0.4, 0.9, None), (-0.7, 0.2, None), (1.2, -0.05, None), (0.3, 0.0, 4), (0.8, 5.0, 2)])
def test_matches_a_numpy_reference(theta_dz, theta_b, fixed_bits):
  w = random_kernel(seed=1)
  w = w.at[0, 0, 0, :4].set(jnp.array([0.5, -0.5, 0.0, 0.45]))  # outliers beyond A + s: the clip is active
  p = codeq.deadzone_params(w, theta_dz, theta_b, fixed_bits=fixed_bits)
  # The grid in float64 from A (checked against numpy's quantile below) and the logits.
  top = float(p['top'])
  bits = fixed_bits if fixed_bits is not None else round(6 * abs(math.tanh(theta_b)) + 2)
  levels = 2 ** (bits - 1) - 1
  dead_zone = 2 * top * (1 - abs(math.tanh(theta_dz)))
  step = (top - dead_zone / 2) / (levels - 0.5) + 1e-8
  shift = dead_zone / 2 - step / 2
  tol = 16 * top * EPS32
  assert int(p['bits']) == bits
  for name, want in [('dead_zone', dead_zone), ('step', step), ('shift', shift)]:
    assert abs(float(p[name]) - want) <= tol, name
  # Given the same float32 step and shift, the codes are exactly numpy's (IEEE division and rounding).
  q, s, sh = codeq.deadzone_codes(w, theta_dz, theta_b, fixed_bits=fixed_bits)
  expected = numpy_codes(w, s, sh, levels)
  np.testing.assert_array_equal(q, expected)
  assert np.max(np.abs(expected)) == levels  # the outliers were clipped to +-Q
  # W^ is s q + sh sign(q), exactly, and equals the dequantized int32 codes bit for bit.
  w_hat = codeq.deadzone_quant(w, theta_dz, theta_b, fixed_bits=fixed_bits)
  np.testing.assert_array_equal(w_hat, np.float32(s) * expected + np.float32(sh) * np.sign(expected))
  np.testing.assert_array_equal(w_hat, codeq.deadzone_dequant(q, s, sh))


def test_top_is_the_linear_099_quantile_of_all_entries():
  w = random_kernel((3, 3, 512, 512), seed=2)  # 2.4M entries: index 0.99 (n - 1) needs more than float32
  want = np.quantile(np.abs(np.asarray(w, np.float64)), 0.99)  # linear interpolation, float64
  assert abs(float(codeq.abs_quantile(w)) - want) <= ulps(want, 1)
  small = jnp.array([0.4, -0.1, 0.3, -0.2, 0.0])  # index 0.99 * 4 = 3.96: 0.3 + 0.96 * (0.4 - 0.3)
  assert abs(float(codeq.abs_quantile(small)) - 0.396) <= ulps(0.396, 1)


def test_dead_zone_is_exactly_zero_and_outside_it_nothing_is():
  w = random_kernel((3, 3, 64, 64), seed=3)
  theta_dz, theta_b = 0.6, 1.0
  p = codeq.deadzone_params(w, theta_dz, theta_b)
  half = float(p['dead_zone']) / 2
  margin = ulps(float(p['top']), 64)  # far more than the rounding of |W| - sh and / s
  w_hat = np.asarray(codeq.deadzone_quant(w, theta_dz, theta_b))
  inside = np.abs(np.asarray(w)) < half - margin
  outside = np.abs(np.asarray(w)) > half + margin
  assert inside.sum() > 1000 and outside.sum() > 1000  # both sides are well populated
  assert np.all(w_hat[inside] == 0.0)
  assert np.all(w_hat[outside] != 0.0)


def test_top_level_is_a_up_to_the_step_epsilon():
  w = random_kernel(seed=4)
  for theta_dz, theta_b in [(3.0, 3.0), (0.5, 1.0), (1.5, 0.1)]:
    p = codeq.deadzone_params(w, theta_dz, theta_b)
    levels = 2.0 ** (int(p['bits']) - 1) - 1
    top_level = float(jnp.max(jnp.abs(codeq.deadzone_quant(w, theta_dz, theta_b))))
    # s Q + sh = (A - d/2) + 1e-8 (Q - 1/2) + d/2 in exact arithmetic; float32 adds a few roundings of A.
    want = float(p['top']) + 1e-8 * (levels - 0.5)
    assert abs(top_level - want) <= ulps(want, 4)


def test_two_fixed_bits_are_ternary_zero_and_plus_minus_a():
  w = random_kernel(seed=5)
  q, s, sh = codeq.deadzone_codes(w, 0.7, 3.0, fixed_bits=2)
  assert set(np.unique(np.asarray(q)).tolist()) == {-1, 0, 1}
  w_hat = np.asarray(codeq.deadzone_quant(w, 0.7, 3.0, fixed_bits=2))
  levels = np.unique(np.abs(w_hat))
  assert len(levels) == 2 and levels[0] == 0.0
  top = float(codeq.deadzone_params(w, 0.7, 3.0, fixed_bits=2)['top'])
  assert abs(levels[1] - top) <= 5e-9 + ulps(top, 4)  # s + sh = A + 1e-8 / 2


def test_gradient_to_the_weights_is_one_everywhere():
  w = random_kernel((3, 3, 32, 32), seed=6)  # no entry is exactly 0 (sign(0) = 0 stops the gradient there)
  for fixed_bits in [None, 2]:
    grad = jax.grad(lambda w: jnp.sum(codeq.deadzone_quant(w, 0.5, 1.0, fixed_bits=fixed_bits)))(w)
    np.testing.assert_array_equal(grad, np.ones(w.shape, np.float32))  # (1 * s) / s is exactly 1
  # ... including deep inside the dead zone and beyond the clip: relu and clip are straight-through.
  small = jnp.array([1e-4, -2e-4, 0.3, -0.3, 5.0])
  np.testing.assert_array_equal(jax.grad(lambda w: jnp.sum(codeq.deadzone_quant(w, 0.2, 0.5)))(small), 1.0)


def test_gradients_to_the_logits_are_finite_and_nonzero():
  w = random_kernel(seed=7)
  loss = lambda w, dz, b, **kw: jnp.sum(codeq.deadzone_quant(w, dz, b, **kw) ** 2)
  _, g_dz, g_b = jax.grad(loss, argnums=(0, 1, 2))(w, 0.5, 1.0)
  assert np.isfinite(g_dz) and np.isfinite(g_b) and g_dz != 0 and g_b != 0
  _, g_dz, g_b = jax.grad(loss, argnums=(0, 1, 2))(w, 0.5, 1.0, fixed_bits=4)
  assert np.isfinite(g_dz) and g_dz != 0
  assert g_b == 0.0  # fixed bits: logit_bit is not used


def test_logit_gradients_match_the_straight_through_chain_rule():
  """d sum(W^) / d theta, derived by hand in float64 from the official formulas and the STE rules."""
  w = random_kernel((4, 4, 8, 8), seed=8)
  theta_dz, theta_b = 0.5, 0.4
  q, s32, _ = codeq.deadzone_codes(w, theta_dz, theta_b)
  q, top = np.asarray(q, np.float64), float(codeq.deadzone_params(w, theta_dz, theta_b)['top'])
  t_dz, t_b = math.tanh(theta_dz), math.tanh(theta_b)
  bits = round(6 * abs(t_b) + 2)
  levels = 2.0 ** (bits - 1) - 1
  d = 2 * top * (1 - abs(t_dz))
  s = (top - d / 2) / (levels - 0.5) + 1e-8
  sh = d / 2 - s / 2
  wv = np.asarray(w, np.float64)
  compressed = np.sign(wv) * np.maximum(np.abs(wv) - sh, 0)

  def d_terms(dd, dlevels):
    """Per-entry derivatives of W^ given derivatives of d and Q (round, clip, relu pass the gradient)."""
    ds = -0.5 * dd / (levels - 0.5) - (top - d / 2) / (levels - 0.5) ** 2 * dlevels
    dsh = dd / 2 - ds / 2
    dcompressed = -np.sign(wv) * dsh
    dq = dcompressed / s - compressed * ds / s ** 2
    return ds * q + s * dq + dsh * np.sign(q)

  terms_dz = d_terms(-2 * top * np.sign(t_dz) * (1 - t_dz ** 2), 0.0)
  terms_b = d_terms(0.0, math.log(2) * 2.0 ** (bits - 1) * 6 * np.sign(t_b) * (1 - t_b ** 2))
  g_dz, g_b = jax.grad(lambda a, b: jnp.sum(codeq.deadzone_quant(w, a, b)), argnums=(0, 1))(theta_dz, theta_b)
  # A float32 sum of n terms, each a few roundings off, errs by at most ~ n eps sum|terms| (observed: 1e-7 rel).
  for got, terms in [(g_dz, terms_dz), (g_b, terms_b)]:
    assert np.sum(terms) != 0
    assert abs(float(got) - np.sum(terms)) <= w.size * EPS32 * np.sum(np.abs(terms))
  assert abs(float(s32) - s) <= ulps(s, 4)


def test_jit_equals_eager_and_vmaps_over_layers():
  w = random_kernel(seed=9)
  eager = codeq.deadzone_quant(w, 0.4, 0.9)
  jitted = jax.jit(lambda w, a, b: codeq.deadzone_quant(w, a, b))(w, 0.4, 0.9)
  np.testing.assert_array_equal(jitted, eager)
  stack = jnp.stack([w, 2 * w])
  batched = jax.jit(jax.vmap(lambda w, a, b: codeq.deadzone_quant(w, a, b)))(
      stack, jnp.array([0.4, 0.4]), jnp.array([0.9, 0.9]))
  np.testing.assert_array_equal(batched[0], eager)
  np.testing.assert_array_equal(batched[1], codeq.deadzone_quant(2 * w, 0.4, 0.9))


def test_initial_logits_give_eight_bits_and_a_one_percent_dead_zone():
  p = codeq.deadzone_params(random_kernel(seed=10), codeq.INIT_LOGIT, codeq.INIT_LOGIT)
  assert int(p['bits']) == 8
  assert abs(float(p['dead_zone']) / float(p['top']) - 2 * (1 - math.tanh(3.0))) <= 8 * EPS32


def test_bits_below_two_are_refused():
  w = random_kernel(seed=11)
  with pytest.raises(ValueError, match='fixed_bits'):
    codeq.deadzone_quant(w, 0.5, 0.5, fixed_bits=1)
  with pytest.raises(ValueError, match='min_bits'):
    codeq.deadzone_quant(w, 0.5, 0.5, min_bits=1)


def test_logits_at_zero_get_zero_gradient_as_in_torch():
  # torch's d|x|/dx at 0 is sign(0) = 0 (jnp.abs's is 1); weight decay pulls the logits towards 0.
  w = random_kernel(seed=12)
  g_dz, g_b = jax.grad(lambda a, b: jnp.sum(codeq.deadzone_quant(w, a, b) ** 2), argnums=(0, 1))(0.0, 0.0)
  assert g_dz == 0.0 and g_b == 0.0


# --------------------------------------------------------------------------------------------------------
# The method: the codeq model, its readout, its export, its settings
# --------------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402

from configs import codeq_mnist5k  # noqa: E402
from picpq_jax import export, models, quant  # noqa: E402
from picpq_jax.models.layers import MaskedQConv  # noqa: E402
from picpq_jax.testing import random_variables  # noqa: E402


def codeq_variables(model, seed=0, logits=None):
  """random_variables of the dense spec plus per-layer logits (varied, so layers differ in dead zone and B)."""
  v = random_variables(model.spec, seed)
  rng = np.random.default_rng(seed + 1)
  for name in model.codeq_layers():
    dz, b = logits if logits is not None else (rng.uniform(0.3, 1.5), rng.uniform(0.1, 1.0))
    v['params'][name] = {**v['params'][name], 'logit_dz': np.float32(dz), 'logit_bit': np.float32(b)}
  return v


def test_quantizer_lives_in_quant_and_is_re_exported():
  assert codeq.deadzone_quant is quant.deadzone_quant and codeq.deadzone_codes is quant.deadzone_codes
  assert codeq.INIT_LOGIT == quant.INIT_LOGIT == 3.0


def test_codeq_conv_forward_is_the_dead_zone_kernel_through_lax_conv():
  spec = models.get_spec('resnet20', 10, 32, 1)
  conv = spec.conv('layer1_0_conv1')
  unit = MaskedQConv(conv, quantizer='codeq', max_bits=6)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, conv.in_channels))
  variables = unit.init(jax.random.key(1), x, False)
  assert float(variables['params']['logit_dz']) == float(variables['params']['logit_bit']) == codeq.INIT_LOGIT
  kernel = random_kernel((3, 3, conv.in_channels, conv.out_channels), seed=3, scale=0.1)
  params = {**variables['params'], 'kernel': kernel, 'logit_dz': jnp.float32(0.6), 'logit_bit': jnp.float32(0.4)}
  _, state = unit.apply({**variables, 'params': params}, x, False, mutable=['intermediates'])
  sown = state['intermediates']['conv'][0]
  w_hat = codeq.deadzone_quant(kernel, 0.6, 0.4, max_bits=6)
  assert 0.2 < float(jnp.mean(w_hat == 0)) < 0.9  # the dead zone is doing something
  want = jax.lax.conv_general_dilated(x, w_hat, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_array_equal(np.asarray(sown), np.asarray(want))
  # with bits: the weight bits are ignored (the kernel is CoDeQ's), activation bits quantize the input
  _, state = unit.apply({**variables, 'params': params}, x, False, bits=(2, 4), mutable=['intermediates'])
  want = jax.lax.conv_general_dilated(quant.act_quant(x, 4), w_hat, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(np.asarray(state['intermediates']['conv'][0]), np.asarray(want), atol=1e-6)


def test_codeq_model_params_and_end_bits():
  spec = models.get_spec('resnet20', 10, 32, 1)
  x = jnp.zeros((1, 32, 32, 1))
  for end_bits, ends_quantized in [(0, True), (4, True), (32, False)]:
    model = models.create_model('resnet20', 10, 32, 1, quantizer='codeq', end_bits=end_bits)
    params = model.init(jax.random.key(0), x)['params']
    assert ('logit_dz' in params['stem']) == ends_quantized == ('logit_bit' in params['classifier'])
    assert 'logit_dz' in params['layer2_1_conv2']
    layers = model.codeq_layers()
    assert set(layers) == ({c.name for c in spec.convs} | {'classifier'}) - (set() if ends_quantized else
                                                                              {'stem', 'classifier'})
    if end_bits == 4:
      assert layers['stem']['fixed_bits'] == layers['classifier']['fixed_bits'] == 4
      assert layers['layer1_0_conv1']['fixed_bits'] is None
  # the dense model's variables load into the codeq model (the logits added) and the picpq model is unchanged
  dense = models.create_model('resnet20', 10, 32, 1)
  assert dense.quantizer == 'picpq' and 'logit_dz' not in dense.init(jax.random.key(0), x)['params']['stem']
  with pytest.raises(ValueError, match='quantizer'):
    models.create_model('resnet20', 10, 32, 1, quantizer='nope').init(jax.random.key(0), x)


def test_initial_variables_copy_the_baseline_and_keep_the_logits_init():
  model = models.create_model('resnet20', 10, 32, 1, quantizer='codeq', end_bits=0)
  baseline = random_variables(model.spec, 4)
  init = codeq.initial_variables(model, baseline)
  for name in ('stem', 'layer3_2_conv2'):
    np.testing.assert_array_equal(init['params'][name]['kernel'], baseline['params'][name]['kernel'])
    np.testing.assert_array_equal(init['batch_stats'][name]['bn']['var'], baseline['batch_stats'][name]['bn']['var'])
    assert float(init['params'][name]['logit_dz']) == codeq.INIT_LOGIT
  np.testing.assert_array_equal(init['params']['classifier']['bias'], baseline['params']['classifier']['bias'])
  other = random_variables(models.get_spec('resnet56', 10, 32, 1))
  with pytest.raises(ValueError, match='resnet20'):
    codeq.initial_variables(model, other)


def test_readout_masks_are_nonzero_quantized_weights_and_bits_the_learned_bits():
  model = models.create_model('resnet20', 10, 32, 1, quantizer='codeq', end_bits=0, max_bits=8)
  variables = codeq_variables(model)
  policy, summary = codeq.readout(model, variables, 'resnet20', 'mnist5k', act_bits=32)
  assert policy.method == 'codeq' and set(policy.layers) == {c.name for c in model.spec.convs}
  total = zeros = 0
  for c in model.spec.convs:
    p = variables['params'][c.name]
    layer = policy.layers[c.name]
    w_hat = codeq.deadzone_quant(jnp.asarray(p['kernel']), p['logit_dz'], p['logit_bit'], max_bits=8)
    np.testing.assert_array_equal(layer.weight_mask, np.asarray(w_hat != 0, np.float32))
    np.testing.assert_array_equal(layer.mask, np.ones(c.out_channels, np.float32))
    bits = int(codeq.learned_bits(p['logit_bit'], 8))
    assert layer.weight_bits == bits == layer.quantizer['bits'] and layer.act_bits == 32
    q, s, sh = codeq.deadzone_codes(jnp.asarray(p['kernel']), p['logit_dz'], p['logit_bit'], max_bits=8)
    assert layer.quantizer['name'] == 'codeq'
    assert layer.quantizer['step'] == float(s) and layer.quantizer['shift'] == float(sh)
    assert isinstance(layer.quantizer['step'], float) and isinstance(layer.quantizer['logit_dz'], float)
    assert summary['layer_sparsity'][c.name] == pytest.approx(float(jnp.mean(q == 0)))
    total, zeros = total + q.size, zeros + int(jnp.sum(q == 0))
  assert summary['conv_sparsity'] == pytest.approx(zeros / total)
  head = summary['classifier']['classifier']
  p = variables['params']['classifier']
  assert head['bits'] == int(codeq.learned_bits(p['logit_bit'], 8)) and 0 <= head['sparsity'] < 1
  # end_bits 32: the stem is full precision and named only with its (all-ones) mask
  model32 = dataclasses.replace(model, end_bits=32)
  policy32, summary32 = codeq.readout(model32, codeq_variables(model32), 'resnet20', 'mnist5k', act_bits=4)
  assert policy32.layers['stem'].weight_bits == 32 and policy32.layers['stem'].act_bits == 32
  assert policy32.layers['stem'].weight_mask is None and summary32['classifier'] == {}
  assert policy32.layers['layer1_0_conv1'].act_bits == 4


@pytest.mark.parametrize('end_bits,act_bits', [(0, 32), (32, 32), (32, 6)])
def test_codeq_export_matches_the_fake_quantized_model(end_bits, act_bits, tmp_path):
  model = models.create_model('resnet20', 10, 32, 1, quantizer='codeq', end_bits=end_bits)
  variables = codeq_variables(model, seed=2)
  policy, summary = codeq.readout(model, variables, 'resnet20', 'mnist5k', act_bits=act_bits)
  assert 0.1 < summary['conv_sparsity'] < 0.95
  quantizers = {name: l.quantizer for name, l in policy.layers.items()}
  quantizers.update(summary['classifier'])
  bits = {name: (l.weight_bits, l.act_bits) for name, l in policy.layers.items()}
  path = str(tmp_path / 'codeq.npz')
  report = export.export_model(path, model.spec, variables, policy.masks, bits, quantizers=quantizers)
  manifest, arrays = export.read_export(path)
  assert manifest['version'] == export.CODEQ_VERSION
  entry = {l['name']: l for l in manifest['layers']}['layer2_0_conv1']
  assert entry['quantizer'] == 'codeq' and entry['weight_bits'] == policy.layers['layer2_0_conv1'].weight_bits
  assert not any('logit' in k for k in arrays)
  # the stored codes are CoDeQ's codes, and the loaded kernels s q + sh sign(q) are the model's W^
  module, loaded, loaded_bits = export.load_model(path)
  p = variables['params']['layer2_0_conv1']
  w_hat = codeq.deadzone_quant(jnp.asarray(p['kernel']), p['logit_dz'], p['logit_bit'])
  np.testing.assert_allclose(loaded['params']['layer2_0_conv1']['kernel'], w_hat, rtol=0, atol=1e-7)
  assert int(loaded_bits['layer2_0_conv1'][0]) == 32
  assert report['conv_weight_bits'] < 32 * report['conv_weights']
  x = jax.random.normal(jax.random.key(5), (4, 32, 32, 1))
  diff = export.logit_difference(path, model.spec, variables, policy.masks, bits, x, model=model)
  logits = model.apply(variables, x, bits=codeq.bits_argument(model, act_bits))
  tol = export.CODEQ_TOLERANCE * max(1.0, float(jnp.max(jnp.abs(logits))))
  assert np.all(diff <= tol), (diff, tol)
  if end_bits == 0:  # a quantized head must be named in `quantizers`
    with pytest.raises(ValueError, match='classifier'):
      export.export_model(str(tmp_path / 'x.npz'), model.spec, variables, policy.masks, bits,
                          quantizers={n: l.quantizer for n, l in policy.layers.items()})


def test_demo_config_passes_check_config():
  config = codeq_mnist5k.get_config()
  assert config.method.name == 'codeq' and not config.finetune.enabled
  codeq.check_config(config, None)


@pytest.mark.parametrize('key,value,needle', [
    ('epochs', 0, 'codeq.epochs'),
    ('learning_rate', float('nan'), 'codeq.learning_rate'),
    ('groups.dead_zone.learning_rate', 0.0, 'codeq.groups.dead_zone.learning_rate'),
    ('groups.bits.weight_decay', -1.0, 'codeq.groups.bits.weight_decay'),
    ('max_bits', 1, 'codeq.max_bits'),
    ('max_bits', 17, 'codeq.max_bits'),
    ('fixed_bits', 9, 'codeq.fixed_bits'),
    ('fixed_bits', 1, 'codeq.fixed_bits'),
    ('act_bits', 1, 'codeq.act_bits'),
    ('act_bits', 33, 'codeq.act_bits'),
    ('end_bits', 1, 'codeq.end_bits'),
    ('end_bits', 40, 'codeq.end_bits'),
    ('optimizer', 'adam', 'codeq.optimizer'),
])
def test_check_config_rejects_bad_settings_naming_the_key(key, value, needle):
  config = codeq_mnist5k.get_config()
  node = config.codeq
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=needle.replace('.', r'\.') + '=') as e:
    codeq.check_config(config, None)
  assert str(e.value).count('. ') == 0 or str(e.value).endswith('.')  # one sentence


def test_check_config_accepts_fixed_bits_and_published_settings():
  config = codeq_mnist5k.get_config()
  config.codeq.fixed_bits = 4
  config.codeq.end_bits = 0
  config.codeq.act_bits = 8
  codeq.check_config(config, None)
