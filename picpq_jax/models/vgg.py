"""VGG-16-BN for CIFAR as an `ArchSpec`.

conv3x3 + BN + ReLU at [64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3]; head: average pool ->
Linear(512, 512) -> BN -> ReLU -> Linear(512, classes). The average pool is global: at 32x32 inputs the
last feature map is 2x2, where the original's avgpool(2) is the same operation. No chains.
"""
from __future__ import annotations

from picpq_jax.models.spec import ArchSpec, BlockSpec, ConvSpec, DenseSpec, with_chains

CONFIG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
# B_max of the 13 convs in forward order (METHOD.md, "Bits"), written as the original's vgg_main.py writes its
# qbw_upper. It is per conv, not per stage: conv1 (stage 1) shares stage 2's 8 bits, and stages 4 and 5 both
# get 4.
B_MAX = [32] + [8] * 3 + [6] * 3 + [4] * 6


def build_spec(num_classes: int, image_size: int, in_channels: int) -> ArchSpec:
  convs, blocks = [], []
  prev, width, size = None, in_channels, image_size
  for item in CONFIG:
    if item == 'M':
      blocks.append(BlockSpec('maxpool', pool=(2, 2, 0)))
      size //= 2
      continue
    name = f'conv{len(convs)}'
    convs.append(ConvSpec(name, width, item, 3, 1, size, size, source=prev, b_max=B_MAX[len(convs)]))
    blocks.append(BlockSpec('conv', (name,)))
    prev, width = name, item
  head = (DenseSpec('fc1', width, 512, source=prev, batch_norm=True),
          DenseSpec('classifier', 512, num_classes, source=None))
  return ArchSpec('vgg16', num_classes, image_size, in_channels, with_chains(convs, []), tuple(blocks), head)
