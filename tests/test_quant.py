"""Quantizers against hand-worked values and finite differences of their non-rounding parts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import quant



def test_act_quant_2bit_hand_worked():
  # 2 bits: 2^2 - 1 = 3 levels above 0. clip -> [0, .1, .26, .5, .9, 1]; x3 -> [0, .3, .78, 1.5, 2.7, 3];
  # round (half to even) -> [0, 0, 1, 2, 3, 3]; /3.
  x = jnp.array([-0.5, 0.1, 0.26, 0.5, 0.9, 1.5])
  np.testing.assert_allclose(quant.act_quant(x, 2), np.array([0, 0, 1, 2, 3, 3]) / 3, atol=1e-7)


def test_act_quant_signed_and_full_precision():
  x = jnp.array([-2.0, -0.4, 0.2, 0.7, 3.0])
  np.testing.assert_allclose(quant.act_quant(x, 32), [0, 0, 0.2, 0.7, 3.0])  # plain ReLU
  np.testing.assert_allclose(quant.act_quant(x, 32, signed=True), x)  # identity
  # signed 3 bits: n = 3; clip -> [-1, -.4, .2, .7, 1] x3 -> [-3, -1.2, .6, 2.1, 3] -> [-3, -1, 1, 2, 3]
  np.testing.assert_allclose(quant.act_quant(x, 3, signed=True), np.array([-3, -1, 1, 2, 3]) / 3, atol=1e-7)


def test_weight_quant_hand_worked():
  w = jnp.array([0.5, -1.0, 0.05, 2.0])
  t = np.tanh(np.array([0.5, -1.0, 0.05, 2.0]))
  t = t / np.abs(t).max()  # [0.4794, -0.7900, 0.0518, 1.0]
  np.testing.assert_allclose(t, [0.47942, -0.79001, 0.05183, 1.0], atol=1e-4)
  np.testing.assert_allclose(quant.weight_quant(w, 2), [0, -1, 0, 1])  # n = 1: ternary
  np.testing.assert_allclose(quant.weight_quant(w, 3), np.array([1, -2, 0, 3]) / 3, atol=1e-7)  # n = 3
  np.testing.assert_allclose(quant.weight_quant(w, 1), 0.8875 * np.array([1, -1, 1, 1]), atol=1e-6)
  np.testing.assert_allclose(quant.weight_quant(w, 32), w)


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_weight_quant_levels(bits):
  w = jax.random.normal(jax.random.key(bits), (3, 3, 8, 16))
  q = np.asarray(quant.weight_quant(w, bits))
  n = 2 ** (bits - 1) - 1
  codes = q * n
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)  # on the grid
  assert np.abs(codes).max() == pytest.approx(n)  # the largest |w| maps to +-1
  assert len(np.unique(np.round(codes))) <= 2 ** bits - 1


@pytest.mark.parametrize('bits', [1, 2, 3, 5, 8, 16])
def test_codes_are_integers_and_read_back_from_the_quantized_kernel(bits):
  w = jax.random.normal(jax.random.key(bits), (3, 3, 8, 16)) * 0.3
  codes, step = jax.jit(quant.weight_codes)(w, jnp.int32(bits))
  codes = np.asarray(codes)
  np.testing.assert_array_equal(codes, np.round(codes))
  n = 1 if bits == 1 else 2 ** (bits - 1) - 1
  assert np.abs(codes).max() == n
  w_q = np.asarray(quant.weight_quant(w, bits))
  if bits == 1:
    # step = mean|w|: a float32 sum of N = 1152 terms, which the jitted weight_codes and the eager
    # weight_quant (and each instruction set) may add in another order. Any order of a sum of N non-negative
    # terms is within (N - 1) * 2^-24 relative of the exact sum; two such sums, plus one rounding each for the
    # division, bound the difference.
    np.testing.assert_array_equal(np.where(w_q >= 0, 1.0, -1.0), codes)
    np.testing.assert_allclose(codes * np.float32(step), w_q, rtol=2 * w.size * 2.0 ** -24, atol=0)
  else:
    # step = 1 / n is one correctly rounded division and the codes are integers: equal on any IEEE machine.
    np.testing.assert_array_equal(codes * np.float32(step), w_q)
  # An export's slim model holds weight_quant's output and must recover the same codes and step exactly.
  back, back_step = jax.jit(quant.grid_weight_codes)(w_q, jnp.int32(bits))
  np.testing.assert_array_equal(np.asarray(back), codes)
  # bits 1: every entry is +-step, so max|w_q| is that step exactly; bits >= 2: 1 / n again.
  assert float(back_step) == (float(np.abs(w_q).max()) if bits == 1 else float(step))
  x = jax.random.uniform(jax.random.key(1), (500,), minval=-0.5, maxval=1.5)
  a_codes, a_step = quant.act_codes(x, bits)
  assert set(np.unique(np.asarray(a_codes))) <= set(range(2 ** bits))
  np.testing.assert_array_equal(np.asarray(a_codes * a_step), np.asarray(quant.act_quant(x, bits)))


def test_traced_bits_match_static():
  w = jax.random.normal(jax.random.key(0), (50,))
  x = jax.random.uniform(jax.random.key(1), (50,), minval=-0.5, maxval=1.5)
  f = jax.jit(lambda w, x, b: (quant.weight_quant(w, b), quant.act_quant(x, b)))
  for b in (1, 2, 5, 8, 32):
    qw, qx = f(w, x, jnp.int32(b))
    np.testing.assert_allclose(qw, quant.weight_quant(w, b), rtol=1e-6)
    np.testing.assert_allclose(qx, quant.act_quant(x, b), rtol=1e-6)


def _finite_difference_grad(f, x, eps=1e-3):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[i] = eps
    g[i] = (f(x + d) - f(x - d)) / (2 * eps)
  return g


def test_weight_quant_gradient_is_tanh_and_max_with_straight_through_rounding():
  w = np.array([0.3, -1.2, 0.7, 0.05, -0.4])
  c = np.array([0.5, -1.0, 2.0, 1.5, -0.3])  # a linear read-out, so the gradient is not all ones

  def no_rounding(w):  # t = tanh(w) / max|tanh(w)| (what the STE differentiates)
    t = np.tanh(w)
    return float(np.sum(c * t / np.abs(t).max()))

  expected = _finite_difference_grad(no_rounding, w)
  got = jax.grad(lambda w: jnp.sum(jnp.asarray(c, jnp.float32) * quant.weight_quant(w, 4)))(
      jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_act_quant_gradient_is_clip_gradient():
  x = jnp.array([-0.5, 0.2, 0.6, 0.99, 1.3])
  g = jax.grad(lambda x: jnp.sum(quant.act_quant(x, 3) * jnp.arange(1.0, 6.0)))(x)
  np.testing.assert_allclose(g, [0, 2, 3, 4, 0])  # 1 inside [0, 1] times the read-out weight, 0 outside
