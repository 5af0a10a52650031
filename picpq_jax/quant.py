"""Every quantizer of the toolkit, one per scheme (DESIGN.md): PIC-PQ's (METHOD.md, "Quantizers") and CoDeQ's
dead-zone quantizer (BASELINES.md, "CoDeQ"; section "CoDeQ's dead-zone quantizer" below).

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

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

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


# ----------------------------------------------------------------------------------------------------------
# CoDeQ's dead-zone quantizer
# ----------------------------------------------------------------------------------------------------------
# CoDeQ's dead-zone quantizer (BASELINES.md, "CoDeQ"), computed as the official code computes it.
#
# Source: saintslab/CoDeQ, src/quantizer.py, `DeadZoneLDZCompander.forward` (read at commit 02695e5). Per weight
# tensor W, with two scalar logits theta_dz (dead zone) and theta_b (bits):
#
#     A  = quantile(|W|, 0.99)                                   top level; no gradient
#     B  = round((max_bits - min_bits) * |tanh theta_b| + min_bits)   learned bits (or a fixed number)
#     d  = 2 A (1 - |tanh theta_dz|)                             dead-zone width, 0 .. 2A
#     Q  = 2^(B-1) - 1                                           positive levels
#     s  = (A - d/2) / (Q - 1/2) + 1e-8                          step
#     sh = d/2 - s/2                                             shift
#     q  = clip(round(sign(W) relu(|W| - sh) / s), -Q, Q)        integer codes in [-Q, Q]
#     W^ = s q + sh sign(q)                                      (`deadzone_dequant`)
#
# Gradients as in the official code: round, clip and relu are straight-through (relu even inside the dead
# zone; the clip bounds get none), sign has zero gradient, A has none. Hence dW^/dW = 1 for every W != 0.
#
# What the official code does that BASELINES.md does not spell out (all followed here):
# - The "2" in B is `min_bits`: a buffer fixed at 2.0 in the official module (not a constructor argument),
#   used as B = (max_bits - min_bits) |tanh theta_b| + min_bits. It is an argument here, default 2.
# - With learnable bits off the official module uses a fixed `fixed_bit` buffer (default 4 there).
# - A is `torch_quantile`: the order statistics of the flattened |W| at floor(0.99 (n-1)) and the next one,
#   blended by `torch.lerp` with the fraction computed in double precision. `jnp.quantile` computes the index
#   in float32, which for kernels of millions of entries rounds the fraction (to 1/4 at n ~ 2.4M), so the
#   index is computed here in Python and blended with torch.lerp's formula.
# - The 1e-8 in s puts the top level at s Q + sh = A + 1e-8 (Q - 1/2), not exactly A (at 2 bits A + 5e-9).
# - W = 0 exactly gets zero gradient: W^ depends on W through sign(W) relu(|W| - sh), and sign(0) = 0. A weight
#   that sits at exactly 0 (e.g. a zeroed pruned channel) receives no gradient through the quantizer.
# - |.| of tanh theta has torch's gradient sign(x), 0 at x = 0 (jnp.abs has 1 there).
# - The logits start at 3.0 each (`INIT_LOGIT`): |tanh 3| = 0.995, a dead zone of 1% of A and 8 bits.
# - `attach_weight_quantizers` (src/utils_quantization.py) puts a quantizer on every module that has a
#   `weight` Parameter and no excluded name: convs, linear layers and, unless excluded, BatchNorm's scale.

TOP_QUANTILE = 0.99  # A is this quantile of |W|, so a few outliers do not stretch the grid
STEP_EPSILON = 1e-8  # added to the step in the official code (keeps s > 0 when d = 2A)
INIT_LOGIT = 3.0  # official initial theta_dz and theta_b: almost no dead zone, max_bits
MIN_BITS = 2  # fixed in the official code; at B = 1 the grid has no level besides 0


@jax.custom_vjp
def _straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
  """y in the forward pass, x's gradient (the identity) in the backward; y itself gets none.

  Gives relu and clip their straight-through gradients while their forward value stays exact (the
  `x + stop_gradient(y - x)` idiom would round).
  """
  return y


def _straight_through_fwd(x, y):
  return y, None


def _straight_through_bwd(_, g):
  return g, jnp.zeros_like(g)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def relu_ste(x: jax.Array) -> jax.Array:
  """max(x, 0), gradient 1 everywhere (official `ReluSTE`)."""
  return _straight_through(x, jnp.maximum(x, 0))


def clip_ste(x: jax.Array, low: Any, high: Any) -> jax.Array:
  """clip(x, low, high), gradient 1 to x everywhere and none to the bounds (official `ClampSTE`)."""
  return _straight_through(x, jnp.clip(x, low, high))


def _abs(x: jax.Array) -> jax.Array:
  """|x| with torch's gradient sign(x), which is 0 at x = 0 (jnp.abs's is 1 there)."""
  return x * jnp.sign(x)


def abs_quantile(w: jax.Array, q: float = TOP_QUANTILE) -> jax.Array:
  """Scalar q-quantile of |w| over all entries, linear interpolation, no gradient (official `torch_quantile`).

  The index q (n - 1) is a Python double (n is static), and the two order statistics are blended with
  torch.lerp's formula (from the nearer end), as the official code does.
  """
  flat = jnp.sort(jnp.abs(jax.lax.stop_gradient(w)).reshape(-1))
  index = q * (flat.size - 1)
  low = math.floor(index)
  if index == low:
    return flat[low]
  weight = np.float32(index - low)
  a, b = flat[low], flat[low + 1]
  return a + weight * (b - a) if weight < 0.5 else b - (b - a) * (np.float32(1) - weight)


class DeadZoneGrid(NamedTuple):
  """The quantizer's per-tensor numbers, float32 scalars, differentiable in the logits (A is constant)."""
  top: jax.Array  # A, the 0.99 quantile of |W|
  bits: jax.Array  # B (an integer value; straight-through rounded when learned)
  dead_zone: jax.Array  # d: W^ = 0 exactly where |W| < d / 2
  levels: jax.Array  # Q = 2^(B-1) - 1: codes lie in [-Q, Q]
  step: jax.Array  # s
  shift: jax.Array  # sh


def _check_bits(max_bits: int, min_bits: int, fixed_bits: Optional[Any]) -> None:
  if not MIN_BITS <= min_bits <= max_bits:
    raise ValueError(f'CoDeQ needs {MIN_BITS} <= min_bits <= max_bits (got min_bits={min_bits}, '
                     f'max_bits={max_bits}): below {MIN_BITS} bits the grid has no level besides 0.')
  if isinstance(fixed_bits, (int, float)) and fixed_bits < MIN_BITS:
    raise ValueError(f'CoDeQ needs fixed_bits >= {MIN_BITS} (got {fixed_bits}): below {MIN_BITS} bits the grid '
                     'has no level besides 0.')


def learned_bits(logit_bit: Any, max_bits: int = 8, min_bits: int = MIN_BITS) -> jax.Array:
  """B = round_ste((max_bits - min_bits) |tanh logit_bit| + min_bits), float32 with an integer value."""
  b = (max_bits - min_bits) * _abs(jnp.tanh(jnp.asarray(logit_bit, jnp.float32))) + min_bits
  return round_ste(b)


def deadzone_grid(w: jax.Array, logit_dz: Any, logit_bit: Any, *, max_bits: int = 8, min_bits: int = MIN_BITS,
                  fixed_bits: Optional[Any] = None) -> DeadZoneGrid:
  """(A, B, d, Q, s, sh) of the dead-zone quantizer for the weight tensor `w` (any shape).

  logit_dz, logit_bit: scalars theta_dz, theta_b. fixed_bits: if given (an int or a scalar array), B is this
  number and logit_bit is unused (so it gets no gradient).
  """
  _check_bits(max_bits, min_bits, fixed_bits)
  top = abs_quantile(w).astype(jnp.float32)
  bits = (learned_bits(logit_bit, max_bits, min_bits) if fixed_bits is None
          else jnp.asarray(fixed_bits, jnp.float32))
  dead_zone = 2.0 * top * (1.0 - _abs(jnp.tanh(jnp.asarray(logit_dz, jnp.float32))))
  levels = 2.0 ** (bits - 1.0) - 1.0
  step = (top - dead_zone / 2.0) / (levels - 0.5) + STEP_EPSILON
  shift = dead_zone / 2.0 - step / 2.0
  return DeadZoneGrid(top, bits, dead_zone, levels, step, shift)


def _float_codes(w: jax.Array, grid: DeadZoneGrid) -> jax.Array:
  """q = clip_ste(round_ste(sign(W) relu_ste(|W| - sh) / s), -Q, Q), in w's shape, float."""
  w = w.astype(jnp.float32)
  compressed = jnp.sign(w) * relu_ste(_abs(w) - grid.shift)
  return clip_ste(round_ste(compressed / grid.step), -grid.levels, grid.levels)


def deadzone_dequant(codes: Any, step: Any, shift: Any) -> jax.Array:
  """W^ = s q + sh sign(q): the dequantized tensor from integer (or float) codes q, step s, shift sh (float32).

  Not a pure scale: an export stores both numbers. sign(q) has zero gradient.
  """
  codes = jnp.asarray(codes, jnp.float32)
  return step * codes + shift * jnp.sign(codes)


def deadzone_quant(w: jax.Array, logit_dz: Any, logit_bit: Any, *, max_bits: int = 8, min_bits: int = MIN_BITS,
                   fixed_bits: Optional[Any] = None) -> jax.Array:
  """CoDeQ's fake-quantized weights W^ (w's shape and dtype), with the official straight-through gradients.

  Differentiable in w (dW^/dW = 1 where w != 0), logit_dz and logit_bit (none when fixed_bits is given).
  Arguments as in `deadzone_grid`.
  """
  grid = deadzone_grid(w, logit_dz, logit_bit, max_bits=max_bits, min_bits=min_bits, fixed_bits=fixed_bits)
  return deadzone_dequant(_float_codes(w, grid), grid.step, grid.shift).astype(w.dtype)


def deadzone_codes(w: jax.Array, logit_dz: Any, logit_bit: Any, *, max_bits: int = 8,
                   min_bits: int = MIN_BITS, fixed_bits: Optional[Any] = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(q, s, sh): int32 codes in w's shape and the float32 step and shift; `deadzone_dequant(q, s, sh)`
  equals `deadzone_quant(w, ...)` bit for bit (float32 weights)."""
  grid = deadzone_grid(w, logit_dz, logit_bit, max_bits=max_bits, min_bits=min_bits, fixed_bits=fixed_bits)
  return _float_codes(w, grid).astype(jnp.int32), grid.step, grid.shift


def deadzone_params(w: jax.Array, logit_dz: Any, logit_bit: Any, *, max_bits: int = 8,
                    min_bits: int = MIN_BITS, fixed_bits: Optional[Any] = None) -> dict[str, jax.Array]:
  """The per-tensor readout: bits B (int32), step s, shift sh, dead_zone d and top A (float32 scalars)."""
  grid = deadzone_grid(w, logit_dz, logit_bit, max_bits=max_bits, min_bits=min_bits, fixed_bits=fixed_bits)
  return {'bits': grid.bits.astype(jnp.int32), 'step': grid.step, 'shift': grid.shift,
          'dead_zone': grid.dead_zone, 'top': grid.top}


def deadzone_codes_at(w: Any, step: Any, shift: Any, bits: int) -> jax.Array:
  """int32 codes q of `w` on a dead-zone grid given by its (step, shift, bits), e.g. a policy's readout.

  The same computation as `deadzone_codes` once the grid is known: with the step and shift that
  `deadzone_grid` gave (float32 values), q is bit for bit `deadzone_codes(w, ...)[0]`.
  """
  levels = jnp.float32(2.0 ** (int(bits) - 1) - 1)
  grid = DeadZoneGrid(top=jnp.float32(0), bits=jnp.float32(bits), dead_zone=jnp.float32(0), levels=levels,
                      step=jnp.asarray(step, jnp.float32), shift=jnp.asarray(shift, jnp.float32))
  return _float_codes(jnp.asarray(w), grid).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# OPQ-style unified channel-wise quantizer
# ----------------------------------------------------------------------------------------------------------
# The OPQ-style reconstruction (BASELINES.md, "OPQ"; picpq_jax/methods/opq.py decides the numbers): every
# output channel c of a layer is divided by its scale s_c (max |W_c| of its surviving weights, frozen at
# allocation), and all channels share ONE mid-tread grid of step `step` (in those scaled units) and
# Q = 2^(B-1) - 1 levels each side:
#
#     codes = clip(round_ste(W / (s_c step)), -Q, Q),     W_q = codes * step * s_c
#
# Rounding is straight-through, clip keeps its true gradient. The per-channel s_c folds into the following
# BatchNorm at export (export.py), which leaves one shared codebook per layer.


def opq_codes(w: jax.Array, step: Any, scales: Any, bits) -> tuple[jax.Array, jax.Array]:
  """(codes, channel_step) of the OPQ-style quantizer: W_q = codes * channel_step, channel_step = step * s_c
  broadcast over the output-channel (last) axis. bits: int or traced, 2 <= B < 32 (B >= 32: (w, 1))."""
  k = _levels(bits)
  q = weight_levels(bits)  # 2^(B-1) - 1, as the PIC-PQ grid's n
  channel_step = jnp.asarray(step, jnp.float32) * jnp.asarray(scales, jnp.float32)
  codes = jnp.clip(round_ste(w / channel_step), -q, q)
  full = k >= FULL_PRECISION
  return (jnp.where(full, w, codes).astype(w.dtype),
          jnp.where(full, jnp.ones_like(channel_step), channel_step).astype(w.dtype))


def opq_quant(w: jax.Array, step: Any, scales: Any, bits) -> jax.Array:
  """The OPQ-style fake-quantized kernel codes * step * s_c (w itself at 32 bits); see `opq_codes`."""
  codes, channel_step = opq_codes(w, step, scales, bits)
  return codes * channel_step
