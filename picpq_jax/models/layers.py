"""The masked, quantized conv unit every prunable layer is made of: [quantize input] -> conv -> BN -> mask.

Which weight quantizer a unit uses is a static attribute (`quantizer`, one of `QUANTIZERS`), so a model is
built for one scheme; the quantizers themselves live in quant.py. CoDeQ's units (and the classifier,
`QDense`) own two scalar logits each, 'logit_dz' and 'logit_bit'.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax import dq, quant
from picpq_jax.models.spec import ConvSpec

# 'picpq': quant.weight_codes at the `bits` argument's weight bits, integer codes convolved, scaled once;
# 'codeq': quant.deadzone_quant on every call (bits or none), its float fake-quantized kernel convolved.
# 'opq': quant.opq_quant (OPQ-style unified channel-wise grid, frozen step and channel scales `opq_grid`) at
# the `bits` argument's weight bits, its float fake-quantized kernel convolved; no bits: the float kernel.
# 'djpq': dq.quantize (DJPQ's learned-step quantizer, methods/djpq.py) on the kernel and the input of a unit
# given `dq_settings`, at the bits its own step and range give; the `bits` argument is not read.
QUANTIZERS = ('picpq', 'codeq', 'opq', 'djpq')

BN_MOMENTUM = 0.9  # Flax convention: running = 0.9 * running + 0.1 * batch (PyTorch's momentum 0.1)
BN_EPSILON = 1e-5

# He-normal over fan_out, as torchvision and the original initialize convs.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def check_quantizer(quantizer: str) -> None:
  if quantizer not in QUANTIZERS:
    raise ValueError(f'quantizer={quantizer!r} is not a quantizer of the models; choose one of {list(QUANTIZERS)}.')


def logit_init(key, shape, dtype=jnp.float32):
  """CoDeQ's initial logits (quant.INIT_LOGIT: almost no dead zone, max_bits bits)."""
  del key
  return jnp.full(shape, quant.INIT_LOGIT, dtype)


def deadzone_kernel(module: nn.Module, kernel: jax.Array, max_bits: int, fixed_bits: Optional[int]) -> jax.Array:
  """Declare `module`'s CoDeQ logits and return its fake-quantized kernel W^ (quant.deadzone_quant)."""
  logit_dz = module.param('logit_dz', logit_init, ())
  logit_bit = module.param('logit_bit', logit_init, ())
  return quant.deadzone_quant(kernel, logit_dz, logit_bit, max_bits=max_bits, fixed_bits=fixed_bits)


# A DJPQ unit's own parameters (scalars): the DQ step and range of its kernel and of its input.
DQ_LEAVES = ('w_step', 'w_range', 'a_step', 'a_range')


def dq_unit(module: nn.Module, kernel: jax.Array, x: jax.Array, settings: dq.Settings,
            signed_input: bool) -> tuple[jax.Array, jax.Array]:
  """Declare `module`'s DQ parameters (DQ_LEAVES, initialised for settings.init_bits from the kernel and
  dq.init_act_grid) and return (fake-quantized kernel, fake-quantized input), each on its dq.grid."""
  w_init = dq.init_weight_grid(kernel, settings.init_bits)
  a_init = dq.init_act_grid(settings.init_bits)
  w_step = module.param('w_step', lambda _: w_init[0])
  w_range = module.param('w_range', lambda _: w_init[1])
  a_step = module.param('a_step', lambda _: a_init[0])
  a_range = module.param('a_range', lambda _: a_init[1])
  w = dq.grid(w_step, w_range, signed=True, restrict=settings.restrict)
  a = dq.grid(a_step, a_range, signed=signed_input, restrict=settings.restrict)
  return dq.quantize(kernel, w.step, w.qmax, signed=True), dq.quantize(x, a.step, a.qmax, signed=signed_input)


class MaskedQConv(nn.Module):
  """Conv (no bias) -> BatchNorm -> per-channel 0/1 mask.

  With `bits = (w_bits, a_bits)` the input goes through the k-bit activation quantizer (which takes the place
  of the ReLU before this conv) and the kernel through the k-bit weight quantizer; bits may be traced
  arrays, 32 = full precision. `spec.kernel_on_grid` (an export's slim model): the kernel already holds
  quantized weights, whose codes are read back instead of quantizing again. `activation`, when given, is
  applied to the masked BatchNorm output (the 'conv' blocks pass theirs). The map the feature-map rank is
  taken from is sown as intermediates['conv']: the conv output before BatchNorm, or, for a spec with
  `rank_after_activation` (MobileNetV2's stem and last conv), the output after `activation`. Returns the
  masked BatchNorm output (B, H', W', out_channels), after `activation` when one is given.

  quantizer='codeq' (CoDeQ): params 'logit_dz' and 'logit_bit' (scalars), and the kernel always goes through
  quant.deadzone_quant with `max_bits` / `fixed_bits` (None: learned bits), whether or not `bits` is given;
  with `bits` only its activation bits are used (the input goes through PIC-PQ's activation quantizer, which
  at 32 bits is the ReLU before this conv, a no-op on its already rectified input). The float kernel W^ is
  convolved (dead-zone levels s q + sh sign(q) are not one integer grid).

  weight_mask (kernel-shaped 0/1, e.g. a Policy's): multiplies the QUANTIZED kernel (the codes for 'picpq',
  so the sum stays integer; W^ for 'codeq', so the quantizer's top level A is that of the whole kernel; W_q
  for 'opq', so a pruned entry contributes nothing and gets no gradient).

  quantizer='opq' (OPQ-style, methods/opq.py): `opq_grid` = (step, (s_c per output channel)), frozen; with
  `bits` the kernel goes through quant.opq_quant at the weight bits and the input through PIC-PQ's activation
  quantizer at the activation bits (as CoDeQ's units); without, the float kernel is used.

  quantizer='djpq' (methods/djpq.py): with `dq_settings`, params DQ_LEAVES and the kernel and the input go
  through DQ (`dq_unit`) on every call; `dq_settings` None: a full-precision unit (the stem, PIC-PQ's
  convention). The `bits` argument is not read. DJPQ's channel gate arrives as `mask`: (B, 1, 1, C) in
  training (one value per example and channel), (C,) at test; it multiplies where a mask does.
  """
  spec: ConvSpec
  quantizer: str = 'picpq'
  max_bits: int = 8
  fixed_bits: Optional[int] = None
  opq_grid: Optional[tuple] = None  # 'opq' only: (step, tuple of per-output-channel scales)
  dq_settings: Optional[dq.Settings] = None  # 'djpq' only: the DQ settings of a quantized unit

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: Optional[jax.Array] = None, bits: Any = None,
               activation: Optional[Callable[[jax.Array], jax.Array]] = None,
               weight_mask: Optional[jax.Array] = None):
    s = self.spec
    check_quantizer(self.quantizer)
    kernel = self.param('kernel', conv_init, (s.kernel, s.kernel, s.in_channels // s.groups, s.out_channels))
    step = None
    if self.quantizer == 'codeq':
      kernel = deadzone_kernel(self, kernel, self.max_bits, self.fixed_bits)
      if bits is not None:
        x = quant.act_quant(x, bits[1], signed=s.signed_input or s.source is None)
    elif self.quantizer == 'djpq':
      if self.dq_settings is not None:
        kernel, x = dq_unit(self, kernel, x, self.dq_settings,
                            signed_input=s.signed_input or s.source is None)
    elif self.quantizer == 'opq':
      if bits is not None:
        if self.opq_grid is None:
          raise ValueError(f'conv {s.name!r} uses the opq quantizer but has no opq_grid (step, scales).')
        grid_step, scales = self.opq_grid
        kernel = quant.opq_quant(kernel, grid_step, jnp.asarray(scales, jnp.float32), bits[0])
        x = quant.act_quant(x, bits[1], signed=s.signed_input or s.source is None)
    elif bits is not None:
      w_bits, a_bits = bits[0], bits[1]
      # The image (stem input) and linear bottlenecks are signed: a [0, 1] clip would zero their negatives.
      x, x_step = quant.act_codes(x, a_bits, signed=s.signed_input or s.source is None)
      weight_codes = quant.grid_weight_codes if s.kernel_on_grid else quant.weight_codes
      kernel, w_step = weight_codes(kernel, w_bits)
      step = x_step * w_step
    if weight_mask is not None:
      kernel = kernel * jnp.asarray(weight_mask, kernel.dtype)
    pad = s.kernel // 2
    # With bits, x and kernel hold integer codes: the sum is exact in any order (quant.py), scaled once after.
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(s.stride, s.stride), padding=((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=s.groups)
    if step is not None:
      y = y * step
    if not s.rank_after_activation:
      self.sow('intermediates', 'conv', y)
    y = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name='bn')(y)
    if mask is not None:
      y = y * jnp.asarray(mask, y.dtype)
    if activation is not None:
      y = activation(y)
    if s.rank_after_activation:
      if activation is None:
        raise ValueError(f'conv {s.name!r} takes its rank after its activation but was called without one; '
                         "it must be the conv of a 'conv' block.")
      self.sow('intermediates', 'conv', y)
    return y


class QDense(nn.Module):
  """A dense layer whose kernel goes through CoDeQ's quantizer (params as nn.Dense's, plus the two logits).

  The variables of an nn.Dense of the same features load into it unchanged (the logits keep their init).
  """
  features: int
  max_bits: int = 8
  fixed_bits: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    kernel = deadzone_kernel(self, kernel, self.max_bits, self.fixed_bits)
    return jnp.dot(x, kernel.astype(x.dtype)) + bias
