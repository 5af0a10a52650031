"""The prunable-layer table of a model, derived from its architecture spec (models/spec.py).

`Topology.layers` lists every prunable conv in forward (execution) order with what the cost model, the
global ranking and the bit assignment need: channels, kernel, stride, groups, output size, consumers,
chain id and B_max (the architecture builder's per-layer list, or the config's search.b_max). Index arrays
(`source_index`, ...) give the same facts as numpy arrays, so the pure functions of cost.py and pruning.py
can run under jit/vmap with the topology as a closed-over constant.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from picpq_jax.models import get_spec
from picpq_jax.models.spec import ArchSpec

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


def topology_from_spec(spec: ArchSpec) -> Topology:
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
                  first_dense.out_features, fixed)


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
  in 1..32 per prunable conv in forward order (the config's search.b_max) replaces them. This is the one
  place the override is applied: the bit assignment reads `Layer.b_max`.
  """
  topo = topology_from_spec(get_spec(arch, num_classes, image_size, in_channels))
  if b_max is None:
    return topo
  check_b_max(b_max, topo)
  layers = tuple(dataclasses.replace(l, b_max=int(v)) for l, v in zip(topo.layers, b_max))
  return dataclasses.replace(topo, layers=layers)
