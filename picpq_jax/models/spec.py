"""Architecture specs: the single description from which both the Flax module and the topology are built.

An `ArchSpec` lists every prunable conv (`ConvSpec`, in forward order) with its channels, kernel, stride,
groups, spatial sizes, the conv whose output it reads (`source`) and the chain it belongs to, plus the
block structure the module executes and the dense head. `models/net.py` interprets it as a Flax module;
`topology.py` turns it into the prunable-layer table. Nothing about a network's channels is written twice.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

IMAGE = None  # `source` of a conv that reads the input image


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One prunable conv -> BatchNorm -> mask unit.

  `source` is the conv whose (masked) output this conv reads; with residual adds, every summand's producer
  is in one chain, so any of them gives the same channel mask (we name the most recent one, whose width is
  the width of the tensor read). `b_max` is the layer's available maximum bit-width (METHOD.md, "Bits"),
  given by the architecture's builder, which holds the list the original's scripts use. `signed_input`
  marks a conv whose input does not follow a ReLU (its activation quantizer must keep negative values).
  `rank_after_activation`: the feature-map rank of this conv is taken after the activation that follows
  it (MobileNetV2's stem and last 1x1 conv, as the original taps them) instead of at the conv output.
  """
  name: str
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  in_size: int  # input height = width (pixels)
  out_size: int  # output height = width (pixels)
  source: Optional[str]
  b_max: int
  groups: int = 1
  chain: Optional[str] = None
  signed_input: bool = False
  rank_after_activation: bool = False
  kernel_on_grid: bool = False  # the kernel holds quantized weights already (an export's slim model)

  @property
  def depthwise(self) -> bool:
    return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  """A dense layer of the head; `source` is the conv feeding it through global average pooling (or None
  when it reads another dense layer, which is never pruned)."""
  name: str
  in_features: int
  out_features: int
  source: Optional[str]
  batch_norm: bool = False  # VGG's hidden head layer: Linear -> BN -> ReLU


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One step of the forward pass, interpreted by `models.net.Net`.

  kind: 'conv' (conv, activation), 'maxpool' (3x3 stride 2 pad 1 for ImageNet stems, 2x2 stride 2 for VGG:
  `pool` gives window and stride), 'basic' / 'bottleneck' (ResNet blocks: convs in order, then `shortcut`),
  'inverted' (MobileNetV2: [expand], depthwise, project; `residual`).
  shortcut: 'identity', 'option_a' (stride-2 subsampling + zero channels appended) or a projection conv name.
  """
  kind: str
  convs: tuple[str, ...] = ()
  shortcut: Optional[str] = None
  residual: bool = False
  pool: tuple[int, int, int] = (0, 0, 0)  # (window, stride, padding) for 'maxpool'
  activation: str = 'relu'


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  arch: str
  num_classes: int
  image_size: int
  in_channels: int
  convs: tuple[ConvSpec, ...]
  blocks: tuple[BlockSpec, ...]
  head: tuple[DenseSpec, ...]

  def conv(self, name: str) -> ConvSpec:
    return self._convs_by_name[name]

  @functools.cached_property
  def _convs_by_name(self) -> dict[str, ConvSpec]:
    """name -> ConvSpec, built once per spec (not per lookup; `Net` looks convs up block by block)."""
    return {c.name: c for c in self.convs}


def conv_out_size(size: int, kernel: int, stride: int, padding: int | None = None) -> int:
  """Output size of a conv / pool with symmetric padding (kernel // 2 by default), as PyTorch computes it."""
  padding = kernel // 2 if padding is None else padding
  return (size + 2 * padding - kernel) // stride + 1


def assign_chains(names: list[str], links: list[tuple[str, str]]) -> dict[str, Optional[str]]:
  """Union-find over `links` (pairs of convs whose outputs are added, or a depthwise conv and its feeder).

  Returns name -> chain id (the first member in forward order) for members of a chain of two or more,
  None for free layers.
  """
  parent = {n: n for n in names}

  def root(n):
    while parent[n] != n:
      parent[n] = parent[parent[n]]
      n = parent[n]
    return n

  for a, b in links:
    ra, rb = root(a), root(b)
    if ra != rb:
      # Keep the earlier layer as the root so that the id is the first member in forward order.
      first, second = sorted((ra, rb), key=names.index)
      parent[second] = first
  groups: dict[str, list[str]] = {}
  for n in names:
    groups.setdefault(root(n), []).append(n)
  return {n: (root(n) if len(groups[root(n)]) > 1 else None) for n in names}


def with_chains(convs: list[ConvSpec], links: list[tuple[str, str]]) -> tuple[ConvSpec, ...]:
  chains = assign_chains([c.name for c in convs], links)
  return tuple(dataclasses.replace(c, chain=chains[c.name]) for c in convs)
