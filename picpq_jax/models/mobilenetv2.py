"""MobileNetV2, CIFAR variant (stem stride 1), as an `ArchSpec`.

Stem 3x3 conv 32; inverted residual blocks (t, c, n, s) as below: 1x1 expand (absent when t = 1), 3x3
depthwise, 1x1 linear projection; identity residual when stride 1 and channels match; last 1x1 conv 1280;
global average pool; linear classifier. ReLU6 after expand and depthwise. Chains: a depthwise conv shares the
mask of the conv that feeds it; blocks joined by an identity residual chain their projection convs.
"""
from __future__ import annotations

from picpq_jax.models.spec import ArchSpec, BlockSpec, ConvSpec, DenseSpec, conv_out_size, with_chains

SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 1), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
STEM, LAST = 32, 1280
# B_max of the 52 convs in forward order (stem; block 0's depthwise and projection; expand, depthwise and
# projection of blocks 1-16; the last 1x1 conv), written as the original's mbv2_ch_main.py writes its qbw_upper:
# 6 bits for blocks 0-5 (up to the 32-channel blocks), 4 for blocks 6-15, 3 for block 16, and 32 for the stem
# and the last conv, which the original's quantized models keep in full precision (bits.py does too).
B_MAX = [32] + [6] * 17 + [4] * 30 + [3] * 3 + [32]


def build_spec(num_classes: int, image_size: int, in_channels: int) -> ArchSpec:
  size = image_size
  # The stem's and the last conv's feature-map rank is taken after their ReLU6, as the original's
  # generate_rank.py hooks them (features[0][2], features[18][2]); every other conv's at its output.
  convs = [ConvSpec('stem', in_channels, STEM, 3, 1, size, size, source=None, b_max=B_MAX[0],
                    rank_after_activation=True)]
  blocks = [BlockSpec('conv', ('stem',), activation='relu6')]
  links = []
  prev, width, i = 'stem', STEM, 0
  for t, c, n, s in SETTINGS:
    for r in range(n):
      stride = s if r == 0 else 1
      out_size = conv_out_size(size, 3, stride)
      hidden = width * t
      p = f'block{i}_'
      names = []
      feeder = prev
      if t != 1:
        # The block input follows a linear projection (no ReLU): its quantizer must be signed.
        convs.append(ConvSpec(p + 'expand', width, hidden, 1, 1, size, size, source=prev, b_max=B_MAX[len(convs)],
                              signed_input=prev != 'stem'))
        names.append(p + 'expand')
        feeder = p + 'expand'
      convs.append(ConvSpec(p + 'dw', hidden, hidden, 3, stride, size, out_size, source=feeder,
                            b_max=B_MAX[len(convs)], groups=hidden))
      convs.append(ConvSpec(p + 'project', hidden, c, 1, 1, out_size, out_size, source=p + 'dw',
                            b_max=B_MAX[len(convs)]))
      names += [p + 'dw', p + 'project']
      links.append((feeder, p + 'dw'))
      residual = stride == 1 and width == c
      if residual:
        links.append((prev, p + 'project'))
      blocks.append(BlockSpec('inverted', tuple(names), residual=residual, activation='relu6'))
      prev, width, size, i = p + 'project', c, out_size, i + 1
  convs.append(ConvSpec('last_conv', width, LAST, 1, 1, size, size, source=prev, b_max=B_MAX[len(convs)],
                        signed_input=True, rank_after_activation=True))
  if len(convs) != len(B_MAX):  # the list is indexed by position: a changed SETTINGS must change it too
    raise AssertionError(f'MobileNetV2 has {len(convs)} convs but B_MAX has {len(B_MAX)} entries.')
  blocks.append(BlockSpec('conv', ('last_conv',), activation='relu6'))
  head = (DenseSpec('classifier', LAST, num_classes, source='last_conv'),)
  return ArchSpec('mobilenetv2', num_classes, image_size, in_channels, with_chains(convs, links),
                  tuple(blocks), head)
