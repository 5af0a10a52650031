"""`Net`: the Flax module that executes an `ArchSpec` (every architecture of the zoo is one spec)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax import dq, gates
from picpq_jax.models.layers import BN_EPSILON, BN_MOMENTUM, MaskedQConv, QDense, check_quantizer
from picpq_jax.models.spec import ArchSpec

ACTIVATIONS = {'relu': jax.nn.relu, 'relu6': jax.nn.relu6}


def check_layer_names(spec: ArchSpec, what: str, tree: Optional[Mapping[str, Any]]) -> None:
  """Masks and bits must name prunable convs of this model; a typo would otherwise be ignored silently."""
  if tree is None:
    return
  known = {c.name for c in spec.convs}
  unknown = sorted(set(tree) - known)
  if unknown:
    raise ValueError(f'{what} name layer(s) {unknown} that {spec.arch} does not have; '
                     f'its prunable layers are {sorted(known)[:6]}... (see topology.get_topology).')


def option_a_shortcut(x: jax.Array, out_channels: int, stride: int) -> jax.Array:
  """Subsample by `stride`, then append zero channels at the end (He et al.'s option A)."""
  x = x[:, ::stride, ::stride, :]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, out_channels - x.shape[-1])))


class Net(nn.Module):
  """A CNN built from `spec`; `apply(variables, x, train, masks=None, bits=None, weight_masks=None)` -> logits.

  masks: layer name -> (out_channels,) 0/1 floats, multiplied into the BatchNorm output.
  bits: layer name -> (weight_bits, activation_bits) (a pair or a (2,) array; 32 = full precision).
  weight_masks: layer name -> kernel-shaped 0/1 (HWIO), multiplied into the quantized kernel.
  Layers absent from a dict are dense / full precision.

  quantizer (static): 'picpq' (PIC-PQ's quantizers at the `bits` given) or 'codeq' (every prunable conv and
  every dense layer of the head quantized by CoDeQ's dead-zone quantizer, with `max_bits` and `fixed_bits`,
  on every call; `bits` then sets only activation bits; layers.MaskedQConv). end_bits (codeq only), for the
  ends (the convs reading the image and the head's dense layers): 0 = learned like every other layer (as
  published), 2..31 = fixed at that many bits, 32 = not quantized (PIC-PQ's convention).

  quantizer 'opq' (OPQ-style, methods/opq.py): `opq_grids` = ((layer name, step, (s_c, ...)), ...), frozen;
  each conv named there quantizes its kernel with quant.opq_quant at the weight bits given, every other conv
  is PIC-PQ's unit (left at 32 bits by the policy); the head is a plain Dense.

  quantizer 'djpq' (methods/djpq.py): every conv named in `dq_layers` quantizes its kernel and input with DQ
  (`dq_settings`; layers.dq_unit), the others are full precision; the head is a plain Dense. One VIB gate per
  chain and per free conv (gates.groups, params 'gate_<chain or layer>'), multiplied where a mask is:
  noisy in training (apply(..., train=True, rngs={'gate': key})), mu or exactly 0 at test (threshold
  `gate_threshold` on log alpha). `masks`, when given, multiply the gates; `bits` is not read.
  """
  spec: ArchSpec
  quantizer: str = 'picpq'
  max_bits: int = 8
  fixed_bits: Optional[int] = None
  end_bits: int = 0
  opq_grids: tuple = ()  # 'opq' only: ((layer name, step, tuple of per-channel scales), ...)
  dq_layers: tuple = ()  # 'djpq' only: names of the convs DQ quantizes
  dq_settings: Optional[dq.Settings] = None  # 'djpq' only
  gate_threshold: float = 0.0  # 'djpq' only: a channel is pruned where log alpha >= this

  def unit_settings(self, end: bool) -> tuple[str, Optional[int]]:
    """(quantizer, fixed_bits) of a conv or dense layer; `end`: a stem conv or a head layer."""
    if self.quantizer != 'codeq' or not end or self.end_bits == 0:
      return self.quantizer, self.fixed_bits
    if self.end_bits >= 32:
      return 'picpq', None  # not quantized (PIC-PQ's units at the 32 bits they get)
    return 'codeq', int(self.end_bits)

  def codeq_layers(self) -> dict[str, dict]:
    """layer name -> {'max_bits', 'fixed_bits'} of every layer CoDeQ's quantizer runs in (convs and head)."""
    out = {}
    for c in self.spec.convs:
      q, fixed = self.unit_settings(c.source is None)
      if q == 'codeq':
        out[c.name] = {'max_bits': self.max_bits, 'fixed_bits': fixed}
    for d in self.spec.head:
      q, fixed = self.unit_settings(True)
      if q == 'codeq':
        out[d.name] = {'max_bits': self.max_bits, 'fixed_bits': fixed}
    return out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, masks: Optional[Mapping[str, Any]] = None,
               bits: Optional[Mapping[str, Any]] = None,
               weight_masks: Optional[Mapping[str, Any]] = None) -> jax.Array:
    spec = self.spec
    check_quantizer(self.quantizer)
    check_layer_names(spec, 'masks', masks)
    check_layer_names(spec, 'bits', bits)
    check_layer_names(spec, 'weight_masks', weight_masks)
    masks, bits, weight_masks = masks or {}, bits or {}, weight_masks or {}
    units = {}
    grids = {name: (step, scales) for name, step, scales in self.opq_grids}
    if self.quantizer == 'djpq':
      gated = gates.gate_masks(gates.groups(spec.convs), x.shape[0], train, self.gate_threshold)
      masks = {name: g if name not in masks else g * jnp.asarray(masks[name], g.dtype) for name, g in gated.items()}
    for c in spec.convs:
      quantizer, fixed = self.unit_settings(c.source is None)
      if quantizer == 'djpq':
        units[c.name] = MaskedQConv(c, quantizer='djpq', name=c.name,
                                    dq_settings=self.dq_settings if c.name in self.dq_layers else None)
        continue
      if quantizer == 'opq':
        grid = grids.get(c.name)
        units[c.name] = MaskedQConv(c, quantizer='opq' if grid is not None else 'picpq', max_bits=self.max_bits,
                                    fixed_bits=fixed, opq_grid=grid, name=c.name)
        continue
      units[c.name] = MaskedQConv(c, quantizer=quantizer, max_bits=self.max_bits, fixed_bits=fixed, name=c.name)

    def conv(name, h, activation=None):
      return units[name](h, train, masks.get(name), bits.get(name), activation, weight_masks.get(name))

    for block in spec.blocks:
      act = ACTIVATIONS[block.activation]
      if block.kind == 'conv':
        # The unit applies the activation, so that a unit whose rank is taken after it can sow that map.
        x = conv(block.convs[0], x, act)
      elif block.kind == 'maxpool':
        window, stride, pad = block.pool
        x = nn.max_pool(x, (window, window), (stride, stride), padding=((pad, pad), (pad, pad)))
      elif block.kind in ('basic', 'bottleneck'):
        y = x
        for name in block.convs[:-1]:
          y = act(conv(name, y))
        y = conv(block.convs[-1], y)
        last = spec.conv(block.convs[-1])
        if block.shortcut == 'identity':
          shortcut = x
        elif block.shortcut == 'option_a':
          shortcut = option_a_shortcut(x, last.out_channels, spec.conv(block.convs[0]).stride)
        else:
          shortcut = conv(block.shortcut, x)
        x = act(y + shortcut)
      elif block.kind == 'inverted':
        y = x
        for name in block.convs[:-1]:
          y = act(conv(name, y))
        y = conv(block.convs[-1], y)  # linear bottleneck: no activation
        x = x + y if block.residual else y
      else:
        raise ValueError(f'unknown block kind {block.kind!r}')
    x = jnp.mean(x, axis=(1, 2))
    for dense in spec.head:
      quantizer, fixed = self.unit_settings(True)
      if quantizer == 'codeq':
        x = QDense(dense.out_features, max_bits=self.max_bits, fixed_bits=fixed, name=dense.name)(x)
      else:
        x = nn.Dense(dense.out_features, name=dense.name)(x)
      if dense.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         name=dense.name + '_bn')(x)
        x = jax.nn.relu(x)
    return x
