"""Fit a trained network's activations into the activation quantizer's fixed range [0, 1].

The k-bit activation quantizer (METHOD.md) clips to [0, 1]; a network trained without it has post-ReLU
activations of several units, which the clip destroys, and recovering takes the original's hundreds of QAT
epochs. Scaling every BatchNorm output by one factor c (gamma, beta *= c) scales every activation by c:
ReLU commutes with c > 0, residual sums and option-A shortcuts scale with their summands, a conv reading a
scaled input has its BatchNorm running statistics scaled to match (mean *= c, var + eps *= c^2), and the
first dense layer divides by c. So the network computes the same logits (for ReLU networks up to float
rounding; approximately for MobileNetV2, whose ReLU6 does not commute with scaling) while its quantized conv
inputs now fit [0, 1]. We choose c = 1 / (the given percentile of all quantized-conv inputs) on calibration
images, before the quantization-aware stages.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.models.layers import BN_EPSILON, MaskedQConv
from picpq_jax.models.spec import ArchSpec


def conv_input_percentile(model, variables: Mapping[str, Any], images: jax.Array, masks=None,
                          percentile: float = 99.9) -> float:
  """The `percentile` of all values entering the convs that read a previous layer (not the image).

  The values are gathered on the device and ranked on the host: numpy's selection is linear in their number
  (tens of millions: 0.8 s on a CPU core), XLA's percentile sorts them (24 s).
  """
  readers = {c.name for c in model.spec.convs if c.source is not None}

  def inputs(variables, images):
    seen = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, MaskedQConv) and context.method_name == '__call__' and \
          context.module.name in readers:
        seen.append(jnp.ravel(args[0]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply(variables, images, train=False, masks=masks)
    return jnp.concatenate(seen)

  return float(np.percentile(np.asarray(jax.jit(inputs)(variables, images)), percentile))


def scale_activations(spec: ArchSpec, variables: Mapping[str, Any], c: float) -> dict:
  """Variables of the same network with every activation multiplied by c (see the module docstring)."""
  params = dict(variables['params'])
  stats = dict(variables['batch_stats'])
  for conv in spec.convs:
    unit = dict(params[conv.name])
    unit['bn'] = {'scale': unit['bn']['scale'] * c, 'bias': unit['bn']['bias'] * c}
    params[conv.name] = unit
    if conv.source is not None:  # its input is scaled, so is its conv output
      bn = stats[conv.name]['bn']
      # var + eps must scale by c^2 exactly: var' = c^2 (var + eps) - eps.
      stats[conv.name] = {'bn': {'mean': bn['mean'] * c, 'var': c * c * (bn['var'] + BN_EPSILON) - BN_EPSILON}}
  first = spec.head[0]
  dense = dict(params[first.name])
  dense['kernel'] = dense['kernel'] / c
  params[first.name] = dense
  return {'params': params, 'batch_stats': stats}


def fit_to_quantizer_range(model, variables: Mapping[str, Any], images: jax.Array, masks=None,
                           percentile: float = 99.9) -> tuple[dict, float]:
  """(scaled variables, c) with the `percentile` of quantized-conv inputs moved to 1."""
  high = conv_input_percentile(model, variables, images, masks, percentile)
  c = 1.0 / max(high, 1e-6)
  return scale_activations(model.spec, jax.device_get(variables), c), c
