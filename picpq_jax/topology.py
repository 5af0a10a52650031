"""The prunable-layer table of a model, derived from its architecture spec (models/spec.py).

`Topology.layers` lists every prunable conv in forward (execution) order with what the cost model, the
global ranking and the bit assignment need: channels, kernel, stride, groups, output size, consumers,
chain id and B_max (the architecture builder's per-layer list, or the config's search.b_max). Index arrays
(`source_index`, ...) give the same facts as numpy arrays, so the pure functions of cost.py and pruning.py
can run under jit/vmap with the topology as a closed-over constant.

It also holds the one rule for which kernel entries a channel mask removes (`kernel_keep`, `kernel_mask`):
the bit assignment, the zeroing of pruned weights, the cost ledger's weight counts and the export's slicing
all call it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import numpy as np

from picpq_jax.models import get_spec
from picpq_jax.models.spec import ArchSpec, DenseSpec

@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  index: int  # position in forward order
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  groups: int
  out_height: int
  out_width: int
  source: Optional[str]  # the conv whose output this conv reads (None: the image)
  consumers: tuple[str, ...]  # convs (and dense layers, e.g. 'classifier') that read this layer's output
  chain: Optional[str]  # chain id shared by layers that keep one mask; None for a free layer
  b_max: int  # the available maximum bit-width (METHOD.md, "Bits")

  @property
  def depthwise(self) -> bool:
    return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class Topology:
  arch: str
  num_classes: int
  in_channels: int
  layers: tuple[Layer, ...]
  head_source: str  # conv read by the first dense layer (through global average pooling)
  head_out_features: int  # outputs of the first dense layer
  head_fixed_macs: int  # MACs of the dense layers after the first (never pruned)
  # The spec's dense layers (first one first); () for a topology built by hand, which then has a single
  # dense layer of head_out_features outputs with a bias (what cost.params assumes).
  head: tuple[DenseSpec, ...] = ()

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(l.name for l in self.layers)

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def layer(self, name: str) -> Layer:
    return self.layers[self.index(name)]

  def index(self, name: str) -> int:
    try:
      return self.names.index(name)
    except ValueError:
      raise ValueError(f'{self.arch} has no prunable layer {name!r}.') from None

  @property
  def chains(self) -> dict[str, tuple[str, ...]]:
    """chain id -> member layer names in forward order."""
    out: dict[str, list[str]] = {}
    for l in self.layers:
      if l.chain is not None:
        out.setdefault(l.chain, []).append(l.name)
    return {k: tuple(v) for k, v in out.items()}

  # Index arrays for jitted code (numpy, so they are compile-time constants).
  @property
  def out_channels(self) -> np.ndarray:
    return np.array([l.out_channels for l in self.layers], np.int32)

  @property
  def source_index(self) -> np.ndarray:
    """Index of each layer's source layer, -1 for the image."""
    return np.array([-1 if l.source is None else self.index(l.source) for l in self.layers], np.int32)

  @property
  def b_max(self) -> np.ndarray:
    return np.array([l.b_max for l in self.layers], np.int32)


@functools.lru_cache(maxsize=64)
def _topology_from_spec(spec: ArchSpec) -> Topology:
  consumers: dict[str, list[str]] = {c.name: [] for c in spec.convs}
  for c in spec.convs:
    if c.source is not None:
      consumers[c.source].append(c.name)
  first_dense = spec.head[0]
  consumers[first_dense.source].append(first_dense.name)
  layers = tuple(
      Layer(name=c.name, index=i, in_channels=c.in_channels, out_channels=c.out_channels, kernel=c.kernel,
            stride=c.stride, groups=c.groups, out_height=c.out_size, out_width=c.out_size, source=c.source,
            consumers=tuple(consumers[c.name]), chain=c.chain, b_max=c.b_max)
      for i, c in enumerate(spec.convs))
  fixed = sum(d.in_features * d.out_features for d in spec.head[1:])
  return Topology(spec.arch, spec.num_classes, spec.in_channels, layers, first_dense.source,
                  first_dense.out_features, fixed, tuple(spec.head))


def topology_from_spec(spec: ArchSpec, b_max=None) -> Topology:
  """The prunable-layer table of `spec`: the one way from a spec to its topology.

  Cached by spec (an ArchSpec is hashable), so callers that hold only the spec (export) get the same table
  again without rebuilding it. b_max: None keeps each layer's B_max from the spec; a sequence of one integer
  in 1..32 per prunable conv in forward order (the config's search.b_max) replaces them (`check_b_max`):
  the one place the override is applied.
  """
  topo = _topology_from_spec(spec)
  if b_max is None:
    return topo
  check_b_max(b_max, topo)
  layers = tuple(dataclasses.replace(l, b_max=int(v)) for l, v in zip(topo.layers, b_max))
  return dataclasses.replace(topo, layers=layers)


def check_b_max(b_max, topo: Topology) -> None:
  """Raise ValueError unless `b_max` (the config's search.b_max) is None or one integer in 1..32 per prunable
  conv of `topo`, in forward order."""
  if b_max is None:
    return
  count = f'{topo.arch} has {topo.num_layers} prunable convs'
  fix = 'give one bit-width in 1..32 per conv in forward order, or None for the architecture\'s own list'
  if isinstance(b_max, (str, bytes)) or not hasattr(b_max, '__len__'):
    raise ValueError(f'search.b_max={b_max!r} is not a list of bit-widths ({count}); {fix}.')
  if len(b_max) != topo.num_layers:
    raise ValueError(f'search.b_max has {len(b_max)} entries but {count}; {fix}.')
  for i, v in enumerate(b_max):
    # Genuine integers only (bool is an int subclass; 4.5 is no bit-width). 1..32 is bits.MIN_BITS..MAX_BITS,
    # written out because bits.py imports this module.
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 32:
      raise ValueError(f'search.b_max[{i}]={v!r} (layer {topo.names[i]!r}) is not an integer in 1..32 '
                       f'({count}); {fix}.')


def get_topology(arch: str, num_classes: int, image_size: int, in_channels: int, b_max=None) -> Topology:
  """The prunable-layer table of `arch` for images of `image_size` x `image_size` x `in_channels`.

  b_max: None keeps each layer's B_max from the architecture's builder (models/); a sequence of one integer
  in 1..32 per prunable conv in forward order (the config's search.b_max) replaces them (`topology_from_spec`
  is the one place the override is applied: the bit assignment reads `Layer.b_max`).
  """
  return topology_from_spec(get_spec(arch, num_classes, image_size, in_channels), b_max)


# --------------------------------------------------------------------------------------------------------
# The one rule for which kernel entries a channel mask removes
# --------------------------------------------------------------------------------------------------------


def kernel_input_channels(layer: Layer) -> np.ndarray:
  """(in_channels / groups, out_channels) int: the input channel that kernel entry [..., i, o] of `layer` reads.

  With groups g, output channel o belongs to group o // (out_channels / g) and reads input channels
  group * (in_channels / g) + i for i < in_channels / g: channel i for a plain conv (g = 1), channel o for a
  depthwise one (in_channels / g = 1). A read-only numpy constant (a broadcast view for g = 1).
  """
  if layer.groups < 1 or layer.in_channels % layer.groups or layer.out_channels % layer.groups:
    raise ValueError(f'layer {layer.name!r}: groups={layer.groups} does not divide in_channels='
                     f'{layer.in_channels} and out_channels={layer.out_channels}.')
  in_per_group = layer.in_channels // layer.groups
  inputs = np.arange(in_per_group)[:, None]
  if layer.groups == 1:
    return np.broadcast_to(inputs, (in_per_group, layer.out_channels))
  group = np.arange(layer.out_channels) // (layer.out_channels // layer.groups)
  index = group[None, :] * in_per_group + inputs
  index.setflags(write=False)
  return index


def _channel_keep(keep: Mapping[str, Any], name: Optional[str], channels: int, what: str):
  """keep[name] (..., channels), or all-True numpy bools for the image (name None) or an absent layer."""
  if name is None or name not in keep:
    return np.ones(channels, bool)
  k = keep[name]
  if not hasattr(k, 'shape'):
    k = np.asarray(k)
  if k.ndim < 1 or k.shape[-1] != channels:
    raise ValueError(f'{what}: the mask of {name!r} has shape {tuple(k.shape)}, expected (..., {channels}).')
  return k


def kernel_keep(topology: Topology, keep: Mapping[str, Any], name: str):
  """(in_keep, out_keep) of conv `name`'s kernel under the channel masks `keep`.

  keep: layer name -> (..., out_channels) 0/1 (bool, int or float; numpy, or jnp under jit/vmap, any
  leading batch axes); a layer absent from it keeps every channel, and the stem's input (the image) is never
  masked. Returns
    in_keep:  (..., in_channels / groups, out_channels): the mask of the input channel each kernel entry
              [..., i, o] reads, i.e. the source layer's mask gathered through `kernel_input_channels`;
    out_keep: (..., out_channels): the layer's own mask.
  Kernel entry [..., i, o] survives iff in_keep[..., i, o] and out_keep[..., o] are both 1 (`kernel_mask`).
  A per-(i, o) input mask, because with groups > 1 the input channel an entry reads depends on o.
  """
  layer = topology.layer(name)
  what = f'{topology.arch} layer {name!r}'
  out_keep = _channel_keep(keep, name, layer.out_channels, what)
  source = _channel_keep(keep, layer.source, layer.in_channels, what + ' (its input)')
  return source[..., kernel_input_channels(layer)], out_keep


def kernel_mask(topology: Topology, keep: Mapping[str, Any], name: str):
  """(..., 1, 1, in_channels / groups, out_channels) 0/1 mask of conv `name`'s HWIO kernel: an entry is
  removed iff its output channel or the input channel it reads is masked (`kernel_keep`). It broadcasts
  against the kernel (k, k, in_channels / groups, out_channels); its dtype is that of in_keep * out_keep (bool
  for bool masks)."""
  in_keep, out_keep = kernel_keep(topology, keep, name)
  return (in_keep * out_keep[..., None, :])[..., None, None, :, :]
