"""Straight-through quantizers of PIC-PQ (METHOD.md, "Quantizers").

Both quantizers take `bits` as a Python int or a traced integer/float array, so one compiled function serves
every bit-width; 32 (or more) means full precision. Rounding is straight-through (its gradient is the
identity); clip, tanh and the max keep their true gradients, because only the rounding goes through a
`jax.custom_vjp`.
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


def act_quant(x: jax.Array, bits, signed: bool = False) -> jax.Array:
  """k-bit activation quantizer; it takes the place of the ReLU before a quantized conv.

  Unsigned (the default, inputs that follow a ReLU): y = round(clip(x, 0, 1) * (2^k - 1)) / (2^k - 1);
  at k >= 32 a plain ReLU. Signed (inputs that do not follow a ReLU, e.g. MobileNetV2's linear
  bottlenecks, which clip(x, 0, 1) would zero): y = round(clip(x, -1, 1) * n) / n with n = 2^(k-1) - 1,
  the weights' symmetric grid; at k >= 32 the identity.
  """
  k = _levels(bits)
  if signed:
    n = jnp.maximum(2.0 ** (k - 1) - 1, 1.0)
    q = round_ste(jnp.clip(x, -1.0, 1.0) * n) / n
    full = x
  else:
    n = 2.0 ** jnp.minimum(k, 24.0) - 1  # min() keeps 2^k finite in float32; k >= 32 is not used below
    q = round_ste(jnp.clip(x, 0.0, 1.0) * n) / n
    full = jax.nn.relu(x)
  return jnp.where(k >= FULL_PRECISION, full, q).astype(x.dtype)


def weight_quant(w: jax.Array, bits) -> jax.Array:
  """k-bit weight quantizer over one layer's whole tensor.

  2 <= k < 32: t = tanh(w) / max|tanh(w)|, w_q = round(t * n) / n with n = 2^(k-1) - 1 (a symmetric grid of
  2^k - 1 levels in [-1, 1]; BatchNorm absorbs the scale). k = 1: sign(w) * mean|w|. k >= 32: w.
  """
  k = _levels(bits)
  t = jnp.tanh(w)
  # The floor keeps an all-zero tensor from dividing by zero (NaN would leak through jnp.where's gradient).
  t = t / jnp.maximum(jnp.max(jnp.abs(t)), 1e-12)
  n = jnp.maximum(2.0 ** (jnp.minimum(k, 24.0) - 1) - 1, 1.0)
  multi = round_ste(t * n) / n
  binary = sign_ste(w) * jnp.mean(jnp.abs(w))
  q = jnp.where(k <= 1, binary, multi)
  return jnp.where(k >= FULL_PRECISION, w, q).astype(w.dtype)
