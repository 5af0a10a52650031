"""Straight-through quantizers of PIC-PQ (METHOD.md, "Quantizers").

Both quantizers take `bits` as a Python int or a traced integer/float array, so one compiled function serves
every bit-width; 32 (or more) means full precision. Rounding is straight-through (its gradient is the
identity); clip, tanh and the max keep their true gradients, because only the rounding goes through a
`jax.custom_vjp`.

Each quantizer is a pair (codes, step) with the quantized tensor codes * step; `models.layers.MaskedQConv`
convolves the integer codes and scales the sum once. Sums of integer products are exact in float32 (below
2^24) in any order, so the masked model and an export's slimmed model, whose convs add the same products in
another order, give the same activations bit for bit, and no activation flips across a rounding step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FULL_PRECISION = 32


@jax.custom_vjp
def round_ste(x: jax.Array) -> jax.Array:
  """`jnp.round` whose gradient is the identity (the straight-through estimator)."""
  return jnp.round(x)


def _round_ste_fwd(x):
  return jnp.round(x), None


def _round_ste_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


@jax.custom_vjp
def sign_ste(x: jax.Array) -> jax.Array:
  """sign(x) with 0 -> +1, gradient straight through (identity)."""
  return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


sign_ste.defvjp(lambda x: (sign_ste(x), None), lambda _, g: (g,))


def _levels(bits) -> jax.Array:
  return jnp.asarray(bits, jnp.float32)


def act_codes(x: jax.Array, bits, signed: bool = False) -> tuple[jax.Array, jax.Array]:
  """(codes, step) of the k-bit activation quantizer: the quantized activation is codes * step.

  Unsigned (inputs that follow a ReLU): codes = round(clip(x, 0, 1) * n), n = 2^k - 1, step = 1 / n.
  Signed (inputs that do not follow a ReLU, e.g. MobileNetV2's linear bottlenecks, which clip(x, 0, 1) would
  zero): codes = round(clip(x, -1, 1) * n) with n = 2^(k-1) - 1, the weights' symmetric grid.
  k >= 32: codes = relu(x) (unsigned) or x (signed), step = 1. codes are integers below 32 bits.
  """
  k = _levels(bits)
  if signed:
    n = jnp.maximum(2.0 ** (k - 1) - 1, 1.0)
    codes = round_ste(jnp.clip(x, -1.0, 1.0) * n)
    full = x
  else:
    n = 2.0 ** jnp.minimum(k, 24.0) - 1  # min() keeps 2^k finite in float32; k >= 32 is not used below
    codes = round_ste(jnp.clip(x, 0.0, 1.0) * n)
    full = jax.nn.relu(x)
  quantized = k < FULL_PRECISION
  return jnp.where(quantized, codes, full).astype(x.dtype), jnp.where(quantized, 1.0 / n, 1.0).astype(x.dtype)


def act_quant(x: jax.Array, bits, signed: bool = False) -> jax.Array:
  """k-bit activation quantizer; it takes the place of the ReLU before a quantized conv.

  Unsigned: y = round(clip(x, 0, 1) * (2^k - 1)) / (2^k - 1), at k >= 32 a plain ReLU. Signed:
  y = round(clip(x, -1, 1) * n) / n with n = 2^(k-1) - 1, at k >= 32 the identity. See `act_codes`.
  """
  codes, step = act_codes(x, bits, signed)
  return codes * step


def weight_levels(bits) -> jax.Array:
  """n of the k-bit symmetric weight grid {-n..n} / n: 2^(min(k, 24) - 1) - 1 (2 <= k < 32), float32."""
  return jnp.maximum(2.0 ** (jnp.minimum(_levels(bits), 24.0) - 1) - 1, 1.0)


def weight_codes(w: jax.Array, bits) -> tuple[jax.Array, jax.Array]:
  """(codes, step) of the k-bit weight quantizer over one layer's whole tensor: w_q = codes * step.

  2 <= k < 32: t = tanh(w) / max|tanh(w)|, codes = round(t * n) in [-n, n], step = 1 / n with
  n = 2^(k-1) - 1 (a symmetric grid of 2^k - 1 levels in [-1, 1]; BatchNorm absorbs the scale).
  k = 1: codes = sign(w) (0 -> +1), step = mean|w|. k >= 32: codes = w, step = 1.
  """
  k = _levels(bits)
  t = jnp.tanh(w)
  # The floor keeps an all-zero tensor from dividing by zero (NaN would leak through jnp.where's gradient).
  t = t / jnp.maximum(jnp.max(jnp.abs(t)), 1e-12)
  n = weight_levels(bits)
  multi = round_ste(t * n)
  step = 1.0 / n
  codes = jnp.where(k <= 1, sign_ste(w), multi)
  step = jnp.where(k <= 1, jnp.mean(jnp.abs(w)), step)
  full = k >= FULL_PRECISION
  return jnp.where(full, w, codes).astype(w.dtype), jnp.where(full, 1.0, step).astype(w.dtype)


def weight_quant(w: jax.Array, bits) -> jax.Array:
  """k-bit weight quantizer over one layer's whole tensor: codes * step of `weight_codes`."""
  codes, step = weight_codes(w, bits)
  return codes * step


def grid_weight_codes(w_q: jax.Array, bits) -> tuple[jax.Array, jax.Array]:
  """(codes, step) of a kernel that already holds `weight_quant`'s output at `bits` (an export's slim model).

  Recovers the codes and step exactly: 2 <= k < 32: step = 1 / n, codes = round(w_q / step) (w_q is within
  one float32 rounding of codes * step); k = 1: step = max|w_q| (every entry is +-mean|w|),
  codes = sign(w_q); k >= 32: (w_q, 1).
  """
  k = _levels(bits)
  n = weight_levels(bits)
  step = jnp.where(k <= 1, jnp.max(jnp.abs(w_q)), 1.0 / n)
  codes = jnp.where(k <= 1, jnp.where(w_q >= 0, 1.0, -1.0), jnp.round(w_q * n))
  full = k >= FULL_PRECISION
  return jnp.where(full, w_q, codes).astype(w_q.dtype), jnp.where(full, 1.0, step).astype(w_q.dtype)
