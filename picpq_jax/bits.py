"""Bit-widths from surviving weight magnitude (METHOD.md, "Bits").

For every prunable conv l, s_l is the fraction of the baseline kernel's total |W| that survives the
pruning, counting a weight as removed when its output filter is pruned OR its input channel is (the
source layer's mask is 0 there: `topology.kernel_mask`, the one rule shared with pruning, cost and export); then

    bits_l = B_max,l                              if nothing of l was removed,
             B_max,l - ceil(penalty / s_l)         otherwise,

clamped to [min_bits, B_max,l]; the stem (the conv reading the image) stays 32-bit, and so does the
classifier (it is not a prunable conv, so it never appears here). A layer whose B_max is 32 stays 32-bit
however much of it was removed: the original lists 32 only for the layers its quantized models keep in
floating point (the stem, and MobileNetV2's last 1x1 conv), so B_max 32 means "not quantized". Weights and
activations of a layer get the same bits. Runs once on the host, in numpy (float64).

    bits = assign_bits(topology, variables['params'], masks)    # layer name -> int
    model.apply(variables, x, masks=masks, bits=bits_tree(bits))
"""
from __future__ import annotations

from typing import Any, Mapping, Union

import jax.numpy as jnp
import numpy as np

from picpq_jax.topology import Layer, Topology, kernel_keep, kernel_mask

FULL_PRECISION = 32
MIN_BITS, MAX_BITS = 1, 32
DEFAULT_PENALTY = 1.0 / 6.0  # lambda of METHOD.md
DEFAULT_MIN_BITS = 2

BMax = Union[None, Mapping[str, int], np.ndarray, list, tuple]


def _check_bit_value(value: Any, what: str) -> int:
  """`value` as an int in 1..32, else ValueError naming `what`."""
  v = np.asarray(value)
  if v.ndim != 0 or not np.isfinite(v) or v != np.round(v) or not MIN_BITS <= v <= MAX_BITS:
    raise ValueError(f'{what} = {value!r} is not a bit-width; use an integer in {MIN_BITS}..{MAX_BITS} '
                     f'({FULL_PRECISION} = full precision).')
  return int(v)


def _check_layer_names(topology: Topology, names, what: str) -> None:
  unknown = sorted(set(names) - set(topology.names))
  if unknown:
    raise ValueError(f'{what} name layer(s) {unknown} that {topology.arch} does not have; its prunable '
                     f'layers are {list(topology.names[:4])}... (topology.names).')


# --------------------------------------------------------------------------------------------------------
# Surviving weight magnitude
# --------------------------------------------------------------------------------------------------------


def keep_vectors(topology: Topology, masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Bool keep vector (out_channels,) of every layer; a layer absent from `masks` keeps everything.

  Raises ValueError for masks naming unknown layers, of the wrong length, or with values other than 0/1.
  """
  _check_layer_names(topology, masks, 'masks')
  keep = {}
  for layer in topology.layers:
    if layer.name not in masks:
      keep[layer.name] = np.ones(layer.out_channels, bool)
      continue
    m = np.asarray(masks[layer.name])
    if m.shape != (layer.out_channels,) or not np.isin(m, (0, 1)).all():
      raise ValueError(f'masks[{layer.name!r}] must be {layer.out_channels} values of 0/1 (one per output '
                       f'channel), got shape {m.shape}.')
    keep[layer.name] = m.astype(bool)
  return keep


def _kernel(params: Mapping[str, Any], name: str) -> np.ndarray:
  if 'params' in params and name not in params:  # a whole variables dict was passed
    params = params['params']
  if name not in params or 'kernel' not in params[name]:
    raise ValueError(f'baseline params have no kernel for layer {name!r}; pass the baseline model\'s '
                     f'params (variables["params"]).')
  return np.asarray(params[name]['kernel'], np.float64)


def surviving_fraction(topology: Topology, baseline_params: Mapping[str, Any],
                       masks: Mapping[str, Any]) -> dict[str, float]:
  """s_l = sum|W_l| of the weights that survive the masks / sum|W_l| of the whole baseline kernel, per layer.

  An all-zero baseline kernel (no magnitude to measure) counts weights instead: s_l = kept / total.
  """
  keep = keep_vectors(topology, masks)
  out = {}
  for layer in topology.layers:
    magnitude = np.abs(_kernel(baseline_params, layer.name))  # (k, k, in / groups, out)
    kept = kernel_mask(topology, keep, layer.name)  # (1, 1, in / groups, out) bool
    if magnitude.shape[2:] != kept.shape[2:]:
      raise ValueError(f'baseline kernel of {layer.name!r} has shape {magnitude.shape}; {topology.arch} '
                       f'expects (k, k, {kept.shape[2]}, {kept.shape[3]}).')
    total = magnitude.sum()
    if total == 0:
      out[layer.name] = float(kept.mean())
    else:
      out[layer.name] = float((magnitude * kept).sum() / total)
  return out


def nothing_removed(topology: Topology, keep: Mapping[str, np.ndarray], layer: Layer) -> bool:
  """True when no output filter and no input channel of `layer` is masked, i.e. s_l == 1 exactly.

  Decided from the masks, not by comparing the float s_l with 1: a sum of float magnitudes over the kept
  weights need not round to exactly the total, and a removed filter whose weights are all 0 leaves s_l at
  1.0 although the layer was pruned (it then gets B_max - ceil(penalty), as any pruned layer with s_l = 1).
  """
  in_keep, out_keep = kernel_keep(topology, keep, layer.name)
  return bool(out_keep.all() and in_keep.all())


# --------------------------------------------------------------------------------------------------------
# Bits
# --------------------------------------------------------------------------------------------------------


def bits_from_fraction(s, b_max, pruned, penalty: float = DEFAULT_PENALTY, min_bits=DEFAULT_MIN_BITS, xp=np):
  """bits = b_max if not pruned else b_max - ceil(penalty / s), clamped to [min_bits, b_max].

  The one copy of the formula, elementwise over numbers or arrays: xp=np on the host (assign_bits, float64),
  xp=jax.numpy under jit (assign_bits_traced). s = 0 (everything removed) gives min_bits. When
  min_bits > b_max the result is b_max: a layer never gets more than its available maximum. b_max 32 (full
  precision) gives 32 whether pruned or not (see the module docstring).
  """
  positive = s > 0
  reduced = xp.where(positive, b_max - xp.ceil(penalty / xp.where(positive, s, 1.0)), min_bits)
  bits = xp.where(pruned & (b_max < FULL_PRECISION), reduced, b_max)
  return xp.minimum(xp.maximum(bits, min_bits), b_max)


def _b_max_table(topology: Topology, b_max: BMax) -> dict[str, int]:
  """layer name -> B_max: the topology's, overridden by a dict (some layers) or an (L,) sequence (all, in
  forward order); every value checked to be an integer in 1..32."""
  table = {l.name: l.b_max for l in topology.layers}
  if b_max is None:
    pass
  elif isinstance(b_max, Mapping):
    _check_layer_names(topology, b_max, 'b_max')
    table.update(b_max)
  else:
    values = np.asarray(b_max)
    if values.shape != (topology.num_layers,):
      raise ValueError(f'b_max must be a dict by layer name or {topology.num_layers} values in forward order, '
                       f'got shape {values.shape}.')
    table = dict(zip(topology.names, values.tolist()))
  return {name: _check_bit_value(v, f'b_max[{name!r}]') for name, v in table.items()}


def assign_bits(topology: Topology, baseline_params: Mapping[str, Any], masks: Mapping[str, Any],
                b_max: BMax = None, penalty: float = DEFAULT_PENALTY,
                min_bits: int = DEFAULT_MIN_BITS) -> dict[str, int]:
  """Bits of every prunable conv (weights and activations alike): layer name -> int, forward order.

  Args:
    topology: the model's prunable-layer table.
    baseline_params: the baseline's params (before fine-tuning): params[name]['kernel'] (k, k, in / g, out).
    masks: layer name -> (out_channels,) 0/1 keep mask; absent layers keep every channel.
    b_max: None (the topology's per-layer B_max), or a dict name -> B_max overriding some layers, or an (L,)
      sequence in forward order.
    penalty: lambda >= 0 of bits = B_max - ceil(lambda / s_l).
    min_bits: the floor of the clamp (the original has none; 1-bit and 0-bit layers break it).
  """
  if not (np.isfinite(penalty) and penalty >= 0):
    raise ValueError(f'penalty (lambda) = {penalty!r} must be a finite number >= 0 (default 1/6).')
  min_bits = _check_bit_value(min_bits, 'min_bits')
  ceiling = _b_max_table(topology, b_max)
  keep = keep_vectors(topology, masks)
  s = surviving_fraction(topology, baseline_params, masks)
  bits = {}
  for layer in topology.layers:
    if layer.source is None:  # the stem reads the image and stays full precision
      bits[layer.name] = FULL_PRECISION
      continue
    pruned = not nothing_removed(topology, keep, layer)
    bits[layer.name] = int(bits_from_fraction(s[layer.name], ceiling[layer.name], pruned, penalty, min_bits))
  return bits


def validate_bits(topology: Topology, bits: Mapping[str, Any]) -> None:
  """Raise ValueError if `bits` names a layer the model does not have or holds a value outside 1..32.

  Values may be one int per layer or a (weight_bits, activation_bits) pair.
  """
  _check_layer_names(topology, bits, 'bits')
  for name, value in bits.items():
    if np.size(value) not in (1, 2):
      raise ValueError(f'bits[{name!r}] = {value!r} must be one bit-width or a (weight, activation) pair.')
    for v in np.asarray(value).reshape(-1):
      _check_bit_value(v, f'bits[{name!r}]')


def bits_tree(bits: Mapping[str, Any]) -> dict[str, jnp.ndarray]:
  """The `bits` argument of `Net.apply`: layer name -> int32 array [w_bits, a_bits] (both the layer's bits).

  Accepts one int per layer (as `assign_bits` returns) or a (weight, activation) pair.
  """
  out = {}
  for name, value in bits.items():
    pair = np.broadcast_to(np.asarray(value), (2,)) if np.size(value) == 1 else np.asarray(value)
    if pair.shape != (2,):
      raise ValueError(f'bits[{name!r}] = {value!r} must be one bit-width or a (weight, activation) pair.')
    out[name] = jnp.asarray([_check_bit_value(v, f'bits[{name!r}]') for v in pair], jnp.int32)
  return out


def assign_bits_traced(topology: Topology, baseline_params: Mapping[str, Any], masks: Mapping[str, Any],
                       penalty: float = DEFAULT_PENALTY, min_bits: int = DEFAULT_MIN_BITS) -> dict[str, Any]:
  """`assign_bits` for traced masks (quantization inside the jitted search fitness): layer name -> int32.

  The same rule with the topology's B_max, in float32 under jit/vmap (no validation: the host-side
  `assign_bits` of the final policy checks its input).
  """
  keep = {l.name: (jnp.asarray(masks[l.name]) > 0.5) if l.name in masks else jnp.ones(l.out_channels, bool)
          for l in topology.layers}
  out = {}
  for layer in topology.layers:
    if layer.source is None:
      out[layer.name] = jnp.int32(FULL_PRECISION)
      continue
    in_keep, out_keep = kernel_keep(topology, keep, layer.name)
    kept = kernel_mask(topology, keep, layer.name)  # (1, 1, in / groups, out) bool
    magnitude = jnp.abs(baseline_params[layer.name]['kernel'])
    total = magnitude.sum()
    s = jnp.where(total > 0, (magnitude * kept).sum() / jnp.maximum(total, 1e-30), kept.mean())
    pruned = ~(out_keep.all() & in_keep.all())
    out[layer.name] = bits_from_fraction(s, layer.b_max, pruned, penalty, min_bits, xp=jnp).astype(jnp.int32)
  return out
