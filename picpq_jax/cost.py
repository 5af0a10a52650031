"""The cost model of a pruned, quantized CNN: MACs ("FLOPs"), parameters and bit-operations (BOPs).

METHOD.md, "Placement and BOPs": a conv l costs out_h * out_w * k * k * (c_in_kept / groups) * c_out_kept
multiply-accumulates, where c_out_kept = keep[l] and c_in_kept = keep[source(l)] (the image's channels for
the stem); a depthwise conv costs out_h * out_w * k * k * c_out_kept (pruning its input removes the
channel outright). The first dense layer reads the kept channels of `topology.head_source` through global
average pooling; the dense layers after it are never pruned. BOPs weight each conv's MACs by its weight and
activation bits and the dense layers' by 32 x 32.

Weight-level (unstructured) pruning (BASELINES.md, "A common cost ledger") is counted by `nonzero`, a (..., L)
array of each conv's nonzero kernel entries within its kept channels: sparse BOPs scale each conv's MACs by
its density nonzero / kernel entries of the kept channels, and weight bits (the model size) are
sum_l nonzero_l * w_bits_l plus the dense layers' kernels at 32 bits. `nonzero_weights` counts them from
channel masks and weight masks (applying `topology.kernel_mask`, the one rule for which kernel entries a
channel mask removes).

Every function is pure jnp over `keep`, a (..., L) array of kept output channels per prunable layer in
forward order (floats or ints; any leading batch axes), so it runs under jit and vmap; the topology is a
closed-over constant whose numpy index arrays are baked into the trace. This is the only copy of these
formulas: pruning.py, the bit assignment and the report all call it. With float `keep` and bits they are
differentiable (products and gathers only): DJPQ's BOPs term (methods/djpq.py) is `bops` of surrogate counts.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.topology import Topology, kernel_mask

DENSE_BITS = 32  # the classifier stays full precision (METHOD.md, "Bits")


@dataclasses.dataclass(frozen=True)
class _Tables:
  """Per-layer constants of the cost formulas, numpy arrays of shape (L,)."""
  window: np.ndarray  # out_h * out_w * k * k: MACs per (input channel per group, output channel) pair
  source: np.ndarray  # index into keep extended by the image's channels at position L
  depthwise: np.ndarray  # bool
  groups: np.ndarray  # groups of a grouped conv that is not depthwise (1 otherwise)
  kernel_area: np.ndarray  # k * k
  head_source: int  # layer read by the first dense layer


@functools.lru_cache(maxsize=None)
def _tables(topology: Topology) -> _Tables:
  layers = topology.layers
  source = topology.source_index.copy()
  source[source < 0] = len(layers)  # the image, appended after the layers by `_input_channels_per_group`
  depthwise = np.array([l.depthwise for l in layers])
  return _Tables(
      window=np.array([l.out_height * l.out_width * l.kernel ** 2 for l in layers], np.int64),
      source=source,
      depthwise=depthwise,
      groups=np.where(depthwise, 1, [l.groups for l in layers]).astype(np.int64),
      kernel_area=np.array([l.kernel ** 2 for l in layers], np.int64),
      head_source=topology.index(topology.head_source))


def _as_keep(keep: Any) -> jax.Array:
  """`keep` as a jnp array of a float or signed integer dtype (bools and unsigned ints become int32)."""
  keep = jnp.asarray(keep)
  return keep if jnp.issubdtype(keep.dtype, jnp.floating) or jnp.issubdtype(keep.dtype, jnp.signedinteger) \
      else keep.astype(jnp.int32)


def _const(value: Any, dtype) -> jax.Array:
  """An integer host constant in `dtype`; in an integer dtype it wraps modulo 2^bits as integer arithmetic
  does, so the int32 cost of a model past 2^31 MACs stays exact modulo 2^32 (pruning.py relies on that)."""
  value = np.asarray(value, np.int64)
  if jnp.issubdtype(dtype, jnp.integer):
    half = np.int64(2) ** (jnp.iinfo(dtype).bits - 1)
    value = (value + half) % (2 * half) - half
  return jnp.asarray(value, dtype)


def _input_channels_per_group(topology: Topology, keep: jax.Array) -> jax.Array:
  """(..., L) kept input channels each output channel of a conv reads: c_in_kept / groups, 1 if depthwise."""
  t = _tables(topology)
  image = jnp.full(keep.shape[:-1] + (1,), topology.in_channels, keep.dtype)
  c_in = jnp.take(jnp.concatenate([keep, image], axis=-1), t.source, axis=-1)
  c_in = jnp.where(t.depthwise, jnp.ones_like(c_in), c_in)
  if np.any(t.groups > 1):
    groups = _const(t.groups, keep.dtype)
    c_in = c_in // groups if jnp.issubdtype(keep.dtype, jnp.integer) else c_in / groups
  return c_in


def layer_macs(topology: Topology, keep: Any) -> jax.Array:
  """(..., L) MACs of each conv for kept output channels `keep` (..., L), in keep's dtype."""
  keep = _as_keep(keep)
  return _const(_tables(topology).window, keep.dtype) * _input_channels_per_group(topology, keep) * keep


def dense_macs(topology: Topology, keep: Any) -> jax.Array:
  """(...,) MACs of the dense head: kept_inputs * head_out_features + the unpruned later dense layers."""
  keep = _as_keep(keep)
  kept_inputs = keep[..., _tables(topology).head_source]
  return kept_inputs * topology.head_out_features + _const(topology.head_fixed_macs, keep.dtype)


def flops(topology: Topology, keep: Any) -> jax.Array:
  """(...,) multiply-accumulates of the pruned model for one image (the paper's "FLOPs").

  keep: (..., L) kept output channels per layer, forward order. The result has keep's dtype: floats for
  totals and reports; int32 is exact below 2^31 and wraps beyond, as integer arithmetic does.
  """
  return jnp.sum(layer_macs(topology, keep), axis=-1) + dense_macs(topology, keep)


def _bit_operations(topology: Topology, keep: jax.Array, conv_macs: jax.Array, w_bits: Any,
                    a_bits: Any) -> jax.Array:
  """(...,) float32 sum_l conv_macs_l * w_bits_l * a_bits_l + dense MACs * 32 * 32 (keep: float32)."""
  w_bits, a_bits = jnp.asarray(w_bits, jnp.float32), jnp.asarray(a_bits, jnp.float32)
  conv = jnp.sum(conv_macs * w_bits * a_bits, axis=-1)
  return conv + dense_macs(topology, keep) * DENSE_BITS * DENSE_BITS


def bops(topology: Topology, keep: Any, w_bits: Any, a_bits: Any) -> jax.Array:
  """(...,) bit-operations: sum_l MACs_l * w_bits_l * a_bits_l + dense MACs * 32 * 32, as float32.

  w_bits, a_bits: (L,) (or broadcastable to keep's shape) weight / activation bits per layer.
  """
  keep = _as_keep(keep).astype(jnp.float32)
  return _bit_operations(topology, keep, layer_macs(topology, keep), w_bits, a_bits)


def kernel_entries(topology: Topology, keep: Any) -> jax.Array:
  """(..., L) kernel entries of each conv within its kept channels, in keep's dtype:
  k * k * (c_in_kept / groups) * c_out_kept (k * k * c_out_kept if depthwise)."""
  keep = _as_keep(keep)
  return _const(_tables(topology).kernel_area, keep.dtype) * _input_channels_per_group(topology, keep) * keep


def dense_weights(topology: Topology, keep: Any) -> jax.Array:
  """(...,) kernel entries of the dense head (biases and BatchNorm excluded), in keep's dtype.

  Each dense weight does one multiply-accumulate per image, so these are exactly `dense_macs`.
  """
  return dense_macs(topology, keep)


def nonzero_weights(topology: Topology, masks: Mapping[str, Any], weight_masks: Mapping[str, Any]) -> jax.Array:
  """(..., L) float32 live kernel entries per conv: what `sparse_bops` and `weight_bits` take as `nonzero`.

  masks: layer name -> (..., out_channels) 0/1 channel mask (a layer absent from it keeps every channel), as
  `keep_counts` takes them. weight_masks: layer name -> (..., k, k, c_in / groups, c_out) array (HWIO, the
  kernel's shape) whose nonzero entries are the live weights: a 0/1 mask or the quantized kernel itself,
  passed as it is. An entry counts when it is nonzero AND the channel masks keep it (`topology.kernel_mask`,
  the one rule for which kernel entries a channel mask removes), so a weight of a pruned channel never
  counts. A layer absent from weight_masks has every entry of its kept channels live (`kernel_entries`, which
  is the rule's count for masks that respect the chains: a depthwise conv's mask equals its source's).
  """
  for name in weight_masks:
    topology.index(name)  # raises for a name the model does not have
  dense = kernel_entries(topology, keep_counts(topology, masks))
  channel_masks = {name: jnp.asarray(m, jnp.float32) for name, m in masks.items()}
  counts = []
  for i, l in enumerate(topology.layers):
    if l.name in weight_masks:
      live = (jnp.asarray(weight_masks[l.name]) != 0) & (kernel_mask(topology, channel_masks, l.name) != 0)
      counts.append(jnp.sum(live, axis=(-4, -3, -2, -1)).astype(jnp.float32))
    else:
      counts.append(dense[..., i])
  batch = jnp.broadcast_shapes(*(jnp.shape(c) for c in counts))
  return jnp.stack([jnp.broadcast_to(c, batch) for c in counts], axis=-1)


def density(topology: Topology, keep: Any, nonzero: Any) -> jax.Array:
  """(..., L) float32 nonzero / kernel entries of the kept channels per conv (0 for a conv with none kept).

  nonzero: (..., L) nonzero kernel entries per conv within its kept channels (`nonzero_weights`).
  """
  entries = kernel_entries(topology, _as_keep(keep).astype(jnp.float32))
  nonzero = jnp.asarray(nonzero, jnp.float32)
  return jnp.where(entries > 0, nonzero / jnp.maximum(entries, 1.0), 0.0)


def sparse_bops(topology: Topology, keep: Any, nonzero: Any, w_bits: Any, a_bits: Any) -> jax.Array:
  """(...,) bit-operations on hardware that skips zero weights, as float32:
  sum_l MACs_l * density_l * w_bits_l * a_bits_l + dense MACs * 32 * 32.

  nonzero: (..., L) nonzero kernel entries per conv within its kept channels (`nonzero_weights`). Equal to
  `bops`, bit for bit, when nonzero = `kernel_entries` (nothing pruned inside a kernel: density is exactly 1).
  """
  keep = _as_keep(keep).astype(jnp.float32)
  conv_macs = layer_macs(topology, keep) * density(topology, keep, nonzero)
  return _bit_operations(topology, keep, conv_macs, w_bits, a_bits)


def weight_bits(topology: Topology, keep: Any, nonzero: Any, w_bits: Any) -> jax.Array:
  """(...,) bits to store the weights, as float32: sum_l nonzero_l * w_bits_l + dense kernel entries * 32.

  The model-size figure (BASELINES.md, "A common cost ledger"): conv and dense kernels only; BatchNorm and
  biases are not counted, nor the positions of the zeros. nonzero: as in `sparse_bops`; w_bits: (L,).
  """
  keep = _as_keep(keep).astype(jnp.float32)
  conv = jnp.sum(jnp.asarray(nonzero, jnp.float32) * jnp.asarray(w_bits, jnp.float32), axis=-1)
  return conv + dense_weights(topology, keep) * DENSE_BITS


@functools.lru_cache(maxsize=None)
def _head_params(topology: Topology) -> tuple[int, int]:
  """(parameters per kept input channel, parameters independent of pruning) of the dense head.

  The first dense layer has kept_inputs * out kernel entries; its bias, its BatchNorm (VGG) and the later
  dense layers do not depend on pruning. They are read from `topology.head`, the spec's dense layers. A
  topology built by hand (head == ()) must have a single dense layer with a bias.
  """
  if not topology.head:
    if topology.head_fixed_macs:
      raise ValueError(f'cost.params cannot count the dense layers after the first of {topology.arch!r}, whose '
                       'topology lists no head (Topology.head); build it with topology.topology_from_spec or '
                       'give it a single dense layer (head_fixed_macs=0).')
    return topology.head_out_features, topology.head_out_features
  fixed = 0
  for i, dense in enumerate(topology.head):
    fixed += dense.out_features * (3 if dense.batch_norm else 1)  # bias (+ BatchNorm scale and bias)
    if i > 0:
      fixed += dense.in_features * dense.out_features
  return topology.head[0].out_features, fixed


def params(topology: Topology, keep: Any) -> jax.Array:
  """(...,) entries of the Flax `params` collection that survive pruning, in keep's dtype.

  Per conv: kernel k * k * (c_in_kept / groups) * c_out_kept (k * k * c_out_kept if depthwise) and the
  BatchNorm scale and bias, 2 * c_out_kept; plus the dense head (`_head_params`). BatchNorm running
  statistics live in `batch_stats`, not `params`, and are not counted.
  """
  keep = _as_keep(keep)
  per_input, fixed = _head_params(topology)
  head = keep[..., _tables(topology).head_source] * per_input + _const(fixed, keep.dtype)
  return jnp.sum(kernel_entries(topology, keep) + 2 * keep, axis=-1) + head


def dense_keep(topology: Topology) -> np.ndarray:
  """(L,) int32 kept channels of the unpruned model: every layer's out_channels."""
  return topology.out_channels


def keep_counts(topology: Topology, masks: Mapping[str, Any]) -> jax.Array:
  """(..., L) float32 kept channels per layer from masks (layer name -> (..., out_channels) 0/1 vector).

  Layers absent from `masks` are unpruned, as in `models.Net`.
  """
  for name in masks:
    topology.index(name)  # raises for a name the model does not have
  batch = next((jnp.shape(m)[:-1] for m in masks.values()), ())
  counts = [jnp.sum(jnp.asarray(masks[l.name], jnp.float32), axis=-1) if l.name in masks
            else jnp.full(batch, l.out_channels, jnp.float32) for l in topology.layers]
  return jnp.stack(counts, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# The ledger of a policy: every figure a report shows, computed here and nowhere else
# ----------------------------------------------------------------------------------------------------------


def ledger(topology: Topology, policy) -> dict:
  """The cost figures of a policy.Policy against the dense FP32 model (BASELINES.md, "A common cost ledger").

  Returns plain floats: flops / params / bops / sparse_bops / weight_bits of the compressed model and their
  `_dense` counterparts (every layer kept, 32 x 32 bits), bops_pruned_fp32 (the kept channels at 32 bits),
  the kept fractions of FLOPs and params, the compression ratios (dense / compressed) of FLOPs, params,
  BOPs, sparse BOPs and weight bits, the fraction of the kept channels' conv weights that are zero, and
  `layers`: per prunable conv its
  channels, kept channels, weight and activation bits, weight density, quantizer name and chain. Sparse BOPs
  and weight bits count weight-level masks (equal to BOPs and dense weight bits without any).
  """
  full = np.full(topology.num_layers, 32, np.float32)
  dense = dense_keep(topology).astype(np.float32)
  keep = np.asarray(keep_counts(topology, policy.masks), np.float32)
  w = np.array([policy.layers[n].weight_bits if n in policy.layers else 32 for n in topology.names], np.float32)
  a = np.array([policy.layers[n].act_bits if n in policy.layers else 32 for n in topology.names], np.float32)
  nonzero = np.asarray(nonzero_weights(topology, policy.masks, policy.weight_masks), np.float32)
  entries = np.asarray(kernel_entries(topology, keep), np.float32)
  dense_entries = np.asarray(kernel_entries(topology, dense), np.float32)
  out = {
      'flops_dense': float(flops(topology, dense)), 'flops': float(flops(topology, keep)),
      'params_dense': float(params(topology, dense)), 'params': float(params(topology, keep)),
      'bops_dense': float(bops(topology, dense, full, full)), 'bops': float(bops(topology, keep, w, a)),
      'bops_pruned_fp32': float(bops(topology, keep, full, full)),
      'sparse_bops': float(sparse_bops(topology, keep, nonzero, w, a)),
      'weight_bits_dense': float(weight_bits(topology, dense, dense_entries, full)),
      'weight_bits': float(weight_bits(topology, keep, nonzero, w)),
  }
  out['flops_kept_fraction'] = out['flops'] / out['flops_dense']
  out['params_kept_fraction'] = out['params'] / out['params_dense']
  out['flops_compression'] = out['flops_dense'] / out['flops']
  out['params_compression'] = out['params_dense'] / out['params']
  out['bops_compression'] = out['bops_dense'] / out['bops']
  out['sparse_bops_compression'] = out['bops_dense'] / out['sparse_bops']
  out['weight_bits_compression'] = out['weight_bits_dense'] / out['weight_bits']
  # Zeros inside the kept channels only: channel pruning is what flops/bops already count.
  out['conv_weight_sparsity'] = 1.0 - float(nonzero.sum() / entries.sum())
  density = np.where(entries > 0, nonzero / np.maximum(entries, 1.0), 0.0)
  out['layers'] = [
      {'layer': l.name, 'channels': l.out_channels, 'kept': int(k), 'weight_bits': int(wb), 'act_bits': int(ab),
       'density': float(d), 'quantizer': policy.quantizers.get(l.name, 'none'), 'chain': l.chain or ''}
      for l, k, wb, ab, d in zip(topology.layers, keep, w, a, density)]
  return out
