"""DQ, the learned-step uniform quantizer DJPQ trains its bit-widths with (BASELINES.md, "DJPQ"; [code:
sony/ai-research-code, mixed-precision-dnns], Uhlich et al., ICLR 2020).

Per tensor two learned scalars: the step d and the range q_max. Weights (symmetric) and activations after a
ReLU (unsigned) are quantized as

    weights:      x^ = d * round(clip(x, -q_max, q_max) / d)
    activations:  x^ = d * round(clip(x, 0, q_max) / d)

and the bit-widths are DERIVED from the two scalars (not learned directly):

    b_w = ceil(log2(q_max / d + 1)) + 1        b_a = ceil(log2(q_max / d + 1))

Gradients as in the DQ paper: round is straight-through (so dx^/dd = round(c/d) - c/d), clip keeps its true
gradient (dx^/dq_max = sign(x) where x is clipped, dx^/dx = 0 there), and ceil in the bit formula passes the
gradient unchanged (it only matters for the BOPs term of methods/djpq.py).

Init for b bits [code]: weights d = 2^ceil(log2(max|W| / (2^(b-1) - 1))), q_max = d (2^(b-1) - 1); activations
d = 2^-3, q_max = d (2^b - 1). Both give exactly b bits.

The parameters live in a box (`project`, applied after every optimizer step, as the code clips them): d in
[2^-8, 1] (weights [code]; activations the same [ours]) and q_max / d in the range that gives min_bits..max_bits
bits [ours: the code bounds q_max by fixed constants], so that the quantizer never has more levels than the
bits counted for it.

DJPQ-restrict [ours]: the derived bits snapped UP to a power of two (2, 4, 8, 16; straight-through), and the
step recomputed from q_max so that the grid fills the snapped bits: d' = q_max / (2^(b-1) - 1) (weights),
q_max / (2^b - 1) (activations).

Signed activations (MobileNetV2's linear-bottleneck inputs, which a [0, q_max] clip would zero) [ours]: the
weights' symmetric clip and bit formula.

Everything here is pure jnp on scalars (d, q_max) and tensors, so it runs under jit and grad.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from picpq_jax.quant import round_ste

STEP_RANGE = (2.0 ** -8, 1.0)  # [code] the weights' step is clipped to this; [ours] the activations' too
ACT_INIT_STEP = 2.0 ** -3  # [code] the activations' initial step
# log2(q_max / d + 1) is compared with an integer through ceil; a ratio within float32 rounding of the top of a
# b-bit grid (2^k - 1, which the init and `project` produce) must count as that grid, not one bit more: its
# largest code round(q_max / d) still fits. 1e-4 bits is far above log2's float32 error (~1e-6 here) and far
# below any ratio that would need another bit.
BITS_SLACK = 1e-4


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every DQ unit of a model shares (hashable: a Flax module attribute).

  init_bits: the bits the steps are initialised for; min_bits / max_bits: the box `project` keeps the bits in;
  restrict: DJPQ-restrict (bits snapped to powers of two)."""
  init_bits: int = 8
  min_bits: int = 2
  max_bits: int = 8
  restrict: bool = False


class Grid(NamedTuple):
  """The grid a tensor is quantized on: step, range q_max and bits (float32 scalars; bits an integer value)."""
  step: jax.Array
  qmax: jax.Array
  bits: jax.Array


def ceil_ste(x: jax.Array) -> jax.Array:
  """ceil(x) in the forward pass (exactly), gradient 1 (the straight-through estimator)."""
  return jnp.ceil(x) + (x - jax.lax.stop_gradient(x))


def positive_levels(bits, signed: bool) -> jax.Array:
  """The largest code of a b-bit grid: 2^(b-1) - 1 (signed: weights) or 2^b - 1 (unsigned activations)."""
  bits = jnp.asarray(bits, jnp.float32)
  return 2.0 ** (bits - 1.0) - 1.0 if signed else 2.0 ** bits - 1.0


def derived_bits(step, qmax, signed: bool) -> jax.Array:
  """b = ceil(log2(q_max / d + 1)) (+ 1 for a signed grid), float32 with an integer value; ceil is
  straight-through."""
  ratio = jnp.asarray(qmax, jnp.float32) / jnp.asarray(step, jnp.float32)
  bits = ceil_ste(jnp.log2(ratio + 1.0) - BITS_SLACK)
  return bits + 1.0 if signed else bits


def snap_bits(bits) -> jax.Array:
  """DJPQ-restrict: bits rounded up to a power of two (2 -> 2, 3 -> 4, 5..8 -> 8), straight-through."""
  bits = jnp.asarray(bits, jnp.float32)
  return 2.0 ** ceil_ste(jnp.log2(bits) - BITS_SLACK)


def grid(step, qmax, *, signed: bool, restrict: bool = False) -> Grid:
  """The grid of one tensor from its learned (d, q_max): bits derived; with `restrict`, snapped to a power of
  two and the step recomputed from q_max (d' = q_max / largest code)."""
  step, qmax = jnp.asarray(step, jnp.float32), jnp.asarray(qmax, jnp.float32)
  bits = derived_bits(step, qmax, signed)
  if restrict:
    bits = snap_bits(bits)
    step = qmax / positive_levels(bits, signed)
  return Grid(step, qmax, bits)


def quantize(x: jax.Array, step, qmax, signed: bool) -> jax.Array:
  """x^ = d round(clip(x, -q_max or 0, q_max) / d), in x's dtype (round straight-through, clip true)."""
  step = jnp.asarray(step, jnp.float32)
  qmax = jnp.asarray(qmax, jnp.float32)
  low = -qmax if signed else 0.0
  return (step * round_ste(jnp.clip(x.astype(jnp.float32), low, qmax) / step)).astype(x.dtype)


def init_weight_grid(kernel: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """(d, q_max) for `bits` weight bits [code]: d = 2^ceil(log2(max|W| / (2^(b-1) - 1))), q_max = d (2^(b-1)-1).

  d is then clipped into STEP_RANGE (a kernel of all zeros gets the smallest step)."""
  levels = 2.0 ** (bits - 1) - 1
  top = jnp.maximum(jnp.max(jnp.abs(jax.lax.stop_gradient(kernel))).astype(jnp.float32), 1e-30)
  step = jnp.clip(2.0 ** jnp.ceil(jnp.log2(top / levels)), *STEP_RANGE)
  return step, step * levels


def init_act_grid(bits: int) -> tuple[jax.Array, jax.Array]:
  """(d, q_max) for `bits` activation bits [code]: d = 2^-3, q_max = d (2^b - 1)."""
  step = jnp.float32(ACT_INIT_STEP)
  return step, step * (2.0 ** bits - 1)


def project(step, qmax, *, signed: bool, min_bits: int, max_bits: int) -> tuple[jax.Array, jax.Array]:
  """(d, q_max) moved into the box: d in STEP_RANGE, q_max in [d L(min_bits), d L(max_bits)] with
  L = positive_levels (the ends give exactly min_bits and max_bits). Idempotent: values inside the box come
  back unchanged, bit for bit."""
  step = jnp.clip(jnp.asarray(step, jnp.float32), *STEP_RANGE)
  low, high = step * positive_levels(min_bits, signed), step * positive_levels(max_bits, signed)
  return step, jnp.clip(jnp.asarray(qmax, jnp.float32), low, high)
