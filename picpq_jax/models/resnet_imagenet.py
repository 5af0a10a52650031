"""ImageNet ResNet-18 / ResNet-50 (torchvision layout, projection shortcuts) as an `ArchSpec`.

Stem 7x7/2 conv 64 and 3x3/2 max-pool; four stages at 64/128/256/512 (x4 for bottlenecks); stride on the
first block's 3x3 conv; a 1x1 projection where the shape changes. Per stage, the projection (or, with an
identity shortcut, the conv producing the stage input) and every block's last conv form a chain.
"""
from __future__ import annotations

from picpq_jax.models.spec import ArchSpec, BlockSpec, ConvSpec, DenseSpec, conv_out_size, with_chains

STAGES = {18: ('basic', (2, 2, 2, 2)), 50: ('bottleneck', (3, 4, 6, 3))}
WIDTHS = (64, 128, 256, 512)
# B_max (METHOD.md, "Bits"): the original has no ImageNet code, so these are our choice on the pattern of its
# CIFAR lists: the stem 32, then 8 / 8 / 6 / 4 bits in stages 1-4 (fewer bits where the feature maps are
# small and the layers wide).
STEM_B_MAX = 32
STAGE_B_MAX = (8, 8, 6, 4)


def build_spec(depth: int, num_classes: int, image_size: int, in_channels: int) -> ArchSpec:
  kind, repeats = STAGES[depth]
  expansion = 4 if kind == 'bottleneck' else 1
  stem_size = conv_out_size(image_size, 7, 2)
  convs = [ConvSpec('stem', in_channels, 64, 7, 2, image_size, stem_size, source=None, b_max=STEM_B_MAX)]
  size = conv_out_size(stem_size, 3, 2, padding=1)
  blocks = [BlockSpec('conv', ('stem',)), BlockSpec('maxpool', pool=(3, 2, 1))]
  links = []
  prev, width = 'stem', 64
  for s, (planes, n) in enumerate(zip(WIDTHS, repeats), start=1):
    out = planes * expansion
    b_max = STAGE_B_MAX[s - 1]
    for b in range(n):
      stride = 2 if (s > 1 and b == 0) else 1
      out_size = conv_out_size(size, 3, stride)
      p = f'layer{s}_{b}_'
      if kind == 'basic':
        names = (p + 'conv1', p + 'conv2')
        convs += [ConvSpec(names[0], width, planes, 3, stride, size, out_size, source=prev, b_max=b_max),
                  ConvSpec(names[1], planes, out, 3, 1, out_size, out_size, source=names[0], b_max=b_max)]
      else:
        names = (p + 'conv1', p + 'conv2', p + 'conv3')
        convs += [ConvSpec(names[0], width, planes, 1, 1, size, size, source=prev, b_max=b_max),
                  ConvSpec(names[1], planes, planes, 3, stride, size, out_size, source=names[0], b_max=b_max),
                  ConvSpec(names[2], planes, out, 1, 1, out_size, out_size, source=names[1], b_max=b_max)]
      if stride != 1 or width != out:
        shortcut = p + 'downsample'
        convs.append(ConvSpec(shortcut, width, out, 1, stride, size, out_size, source=prev, b_max=b_max))
        links.append((shortcut, names[-1]))
      else:
        shortcut = 'identity'
        links.append((prev, names[-1]))
      blocks.append(BlockSpec(kind, names, shortcut=shortcut))
      prev, width, size = names[-1], out, out_size
  head = (DenseSpec('classifier', width, num_classes, source=prev),)
  return ArchSpec(f'resnet{depth}', num_classes, image_size, in_channels, with_chains(convs, links),
                  tuple(blocks), head)
