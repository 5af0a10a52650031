"""CIFAR ResNet-8/20/56/110 (He et al. 2016, option-A shortcuts) as an `ArchSpec`.

Stem 3x3 conv 16, three stages of n basic blocks at 16/32/64 channels (n = (depth - 2) / 6), stride 2 on the
first conv of stages 2 and 3, ReLU after the residual add. The option-A shortcut adds the block input
(subsampled, zero channels appended) to the block's second conv, so the stem and every conv2 form one chain.
"""
from __future__ import annotations

from picpq_jax.models.spec import ArchSpec, BlockSpec, ConvSpec, DenseSpec, conv_out_size, with_chains

WIDTHS = (16, 32, 64)
# B_max (METHOD.md, "Bits"): the stem 32, then 8 / 6 / 4 bits in stages 1 / 2 / 3, the original's ResNet-56
# list [32] + [8]*18 + [6]*18 + [4]*18 (resnet_main.py, resnet_ch_main.py); ResNet-20/110 follow the same
# per-stage rule (the original has no list for them).
STEM_B_MAX = 32
STAGE_B_MAX = (8, 6, 4)


def build_spec(depth: int, num_classes: int, image_size: int, in_channels: int) -> ArchSpec:
  if (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n + 2 (8, 20, 56, 110), got {depth}.')
  n = (depth - 2) // 6
  size = image_size
  convs = [ConvSpec('stem', in_channels, WIDTHS[0], 3, 1, size, size, source=None, b_max=STEM_B_MAX)]
  blocks = [BlockSpec('conv', ('stem',))]
  links = []
  prev, width = 'stem', WIDTHS[0]
  for s, out in enumerate(WIDTHS, start=1):
    for b in range(n):
      stride = 2 if (s > 1 and b == 0) else 1
      out_size = conv_out_size(size, 3, stride)
      c1, c2 = f'layer{s}_{b}_conv1', f'layer{s}_{b}_conv2'
      convs.append(ConvSpec(c1, width, out, 3, stride, size, out_size, source=prev, b_max=STAGE_B_MAX[s - 1]))
      convs.append(ConvSpec(c2, out, out, 3, 1, out_size, out_size, source=c1, b_max=STAGE_B_MAX[s - 1]))
      shortcut = 'option_a' if (stride != 1 or width != out) else 'identity'
      blocks.append(BlockSpec('basic', (c1, c2), shortcut=shortcut))
      links.append((prev, c2))
      prev, width, size = c2, out, out_size
  head = (DenseSpec('classifier', width, num_classes, source=prev),)
  return ArchSpec(f'resnet{depth}', num_classes, image_size, in_channels, with_chains(convs, links),
                  tuple(blocks), head)
