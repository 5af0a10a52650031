"""VGG-16-BN for CIFAR as an `ArchSpec`.

conv3x3 + BN + ReLU at [64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3]; head: average pool ->
Linear(512, 512) -> BN -> ReLU -> Linear(512, classes). The average pool is global: at 32x32 inputs the
last feature map is 2x2, where the original's avgpool(2) is the same operation. No chains.
"""
from __future__ import annotations

from picpq_jax.models.spec import ArchSpec, BlockSpec, ConvSpec, DenseSpec, with_chains

CONFIG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)


def build_spec(num_classes: int, image_size: int, in_channels: int) -> ArchSpec:
  convs, blocks = [], []
  prev, width, size, stage = None, in_channels, image_size, 1
  for item in CONFIG:
    if item == 'M':
      blocks.append(BlockSpec('maxpool', pool=(2, 2, 0)))
      size //= 2
      stage += 1
      continue
    name = f'conv{len(convs)}'
    convs.append(ConvSpec(name, width, item, 3, 1, size, size, source=prev, stage=0 if prev is None else stage))
    blocks.append(BlockSpec('conv', (name,)))
    prev, width = name, item
  head = (DenseSpec('fc1', width, 512, source=prev, batch_norm=True),
          DenseSpec('classifier', 512, num_classes, source=None))
  return ArchSpec('vgg16', num_classes, image_size, in_channels, with_chains(convs, []), tuple(blocks), head)
