"""The prunable-layer table of a model, derived from its architecture spec (models/spec.py).

`Topology.layers` lists every prunable conv in forward (execution) order with what the cost model, the
global ranking and the bit assignment need: channels, kernel, stride, groups, output size, consumers,
chain id and B_max. Index arrays (`source_index`, ...) give the same facts as numpy arrays, so the pure
functions of cost.py and pruning.py can run under jit/vmap with the topology as a closed-over constant.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from picpq_jax.models import get_spec
from picpq_jax.models.spec import ArchSpec

# B_max (METHOD.md, "Bits"): the available maximum bit-width by stage; stage 0 is the stem, which stays 32-bit.
# ResNet-56 is the original's (stem 32, stages 8/6/4); the others are our choice on the same pattern:
# fewer bits where the feature maps are small and the layers wide.
B_MAX_BY_STAGE = {
    'resnet20': (32, 8, 6, 4), 'resnet56': (32, 8, 6, 4), 'resnet110': (32, 8, 6, 4),
    'vgg16': (32, 8, 8, 6, 6, 4),
    'mobilenetv2': (32, 8, 6, 4),
    'resnet18': (32, 8, 8, 6, 4), 'resnet50': (32, 8, 8, 6, 4),
}


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
  b_max: int

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
  b_max_table = B_MAX_BY_STAGE[spec.arch]
  layers = tuple(
      Layer(name=c.name, index=i, in_channels=c.in_channels, out_channels=c.out_channels, kernel=c.kernel,
            stride=c.stride, groups=c.groups, out_height=c.out_size, out_width=c.out_size, source=c.source,
            consumers=tuple(consumers[c.name]), chain=c.chain, b_max=b_max_table[c.stage])
      for i, c in enumerate(spec.convs))
  fixed = sum(d.in_features * d.out_features for d in spec.head[1:])
  return Topology(spec.arch, spec.num_classes, spec.in_channels, layers, first_dense.source,
                  first_dense.out_features, fixed)


def get_topology(arch: str, num_classes: int, image_size: int, in_channels: int) -> Topology:
  """The prunable-layer table of `arch` for images of `image_size` x `image_size` x `in_channels`."""
  return topology_from_spec(get_spec(arch, num_classes, image_size, in_channels))
