"""`Net`: the Flax module that executes an `ArchSpec` (every architecture of the zoo is one spec)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax.models.layers import BN_EPSILON, BN_MOMENTUM, MaskedQConv
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
  """A CNN built from `spec`; `apply(variables, x, train, masks=None, bits=None)` -> logits (B, classes).

  masks: layer name -> (out_channels,) 0/1 floats, multiplied into the BatchNorm output.
  bits: layer name -> (weight_bits, activation_bits) (a pair or a (2,) array; 32 = full precision).
  Layers absent from either dict are dense / full precision.
  """
  spec: ArchSpec

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, masks: Optional[Mapping[str, Any]] = None,
               bits: Optional[Mapping[str, Any]] = None) -> jax.Array:
    spec = self.spec
    check_layer_names(spec, 'masks', masks)
    check_layer_names(spec, 'bits', bits)
    masks, bits = masks or {}, bits or {}
    units = {c.name: MaskedQConv(c, name=c.name) for c in spec.convs}

    def conv(name, h, activation=None):
      return units[name](h, train, masks.get(name), bits.get(name), activation)

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
      x = nn.Dense(dense.out_features, name=dense.name)(x)
      if dense.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         name=dense.name + '_bn')(x)
        x = jax.nn.relu(x)
    return x
