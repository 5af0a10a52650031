"""The masked, quantized conv unit every prunable layer is made of: [quantize input] -> conv -> BN -> mask."""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax import quant
from picpq_jax.models.spec import ConvSpec

BN_MOMENTUM = 0.9  # Flax convention: running = 0.9 * running + 0.1 * batch (PyTorch's momentum 0.1)
BN_EPSILON = 1e-5

# He-normal over fan_out, as torchvision and the original initialize convs.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


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
  """
  spec: ConvSpec

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: Optional[jax.Array] = None, bits: Any = None,
               activation: Optional[Callable[[jax.Array], jax.Array]] = None):
    s = self.spec
    kernel = self.param('kernel', conv_init, (s.kernel, s.kernel, s.in_channels // s.groups, s.out_channels))
    step = None
    if bits is not None:
      w_bits, a_bits = bits[0], bits[1]
      # The image (stem input) and linear bottlenecks are signed: a [0, 1] clip would zero their negatives.
      x, x_step = quant.act_codes(x, a_bits, signed=s.signed_input or s.source is None)
      weight_codes = quant.grid_weight_codes if s.kernel_on_grid else quant.weight_codes
      kernel, w_step = weight_codes(kernel, w_bits)
      step = x_step * w_step
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
