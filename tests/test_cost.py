"""Tests of cost.py against known answers worked out independently of its code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import cost, models
from picpq_jax.topology import Layer, Topology, get_topology

# (arch, classes, image size): the CIFAR models at 32x32, the ImageNet ones at 224x224.
ZOO = [('resnet20', 10, 32), ('resnet56', 10, 32), ('resnet110', 10, 32), ('vgg16', 10, 32),
       ('mobilenetv2', 100, 32), ('resnet18', 1000, 224), ('resnet50', 1000, 224)]


def dense(topology, dtype=np.float32):
  return cost.dense_keep(topology).astype(dtype)


def test_resnet56_cifar10_dense_macs_is_125_49_m():
  t = get_topology('resnet56', 10, 32, 3)
  conv3x3 = lambda size, c_in, c_out: size * size * 9 * c_in * c_out
  stem = conv3x3(32, 3, 16)
  stage1 = 18 * conv3x3(32, 16, 16)  # 9 blocks x 2 convs
  stage2 = conv3x3(16, 16, 32) + 17 * conv3x3(16, 32, 32)  # the first conv1 reads 16 channels at stride 2
  stage3 = conv3x3(8, 32, 64) + 17 * conv3x3(8, 64, 64)
  classifier = 64 * 10
  expected = stem + stage1 + stage2 + stage3 + classifier
  assert expected == 442_368 + 42_467_328 + 41_287_680 + 41_287_680 + 640 == 125_485_696
  assert int(cost.flops(t, cost.dense_keep(t))) == expected  # int32: exact
  assert float(cost.flops(t, dense(t))) == expected


def test_vgg16_cifar_conv_macs_is_313_2_m():
  t = get_topology('vgg16', 10, 32, 3)
  # 3x3 convs per feature-map size: (size, [(c_in, c_out), ...]).
  plan = [(32, [(3, 64), (64, 64)]), (16, [(64, 128), (128, 128)]), (8, [(128, 256), (256, 256), (256, 256)]),
          (4, [(256, 512), (512, 512), (512, 512)]), (2, [(512, 512)] * 3)]
  expected = sum(size * size * 9 * i * o for size, pairs in plan for i, o in pairs)
  assert expected == 313_196_544
  conv = float(jnp.sum(cost.layer_macs(t, dense(t))))
  assert conv == expected
  assert round(conv / 1e6, 1) == 313.2
  # Head: Linear(512, 512) reads the kept channels, Linear(512, 10) is fixed.
  assert float(cost.flops(t, dense(t))) == expected + 512 * 512 + 512 * 10


def test_mobilenetv2_cifar100_dense_macs_is_about_266_m():
  t = get_topology('mobilenetv2', 100, 32, 3)
  # Re-derived from METHOD.md's table (t, c, n, s), not from the spec: stem 3x3 32 at stride 1.
  size, width = 32, 32
  expected = size * size * 9 * 3 * 32
  for expand, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 1), (6, 96, 3, 1),
                          (6, 160, 3, 2), (6, 320, 1, 1)]:
    for r in range(n):
      out = size // (s if r == 0 else 1)
      hidden = width * expand
      expected += (size * size * width * hidden if expand != 1 else 0)  # 1x1 expand
      expected += out * out * 9 * hidden  # 3x3 depthwise
      expected += out * out * hidden * c  # 1x1 project
      size, width = out, c
  expected += size * size * 320 * 1280 + 1280 * 100  # last 1x1 conv, classifier
  assert expected == 265_806_848
  assert float(cost.flops(t, dense(t))) == expected
  assert round(expected / 1e6) == 266


@pytest.mark.parametrize('arch,classes,size', ZOO)
def test_dense_fp32_bops_are_1024_times_macs(arch, classes, size):
  t = get_topology(arch, classes, size, 3)
  bits = np.full(t.num_layers, 32)
  macs = cost.flops(t, dense(t))
  assert float(cost.bops(t, dense(t), bits, bits)) == 1024 * float(macs)


@pytest.mark.parametrize('arch,classes,size', ZOO)
def test_dense_params_equal_the_flax_model(arch, classes, size):
  t = get_topology(arch, classes, size, 3)
  model = models.create_model(arch, classes, size, 3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes['params']))
  assert int(cost.params(t, cost.dense_keep(t))) == count


def tiny_topology():
  """stem 3x3 3->8 at 8x8; 3x3 depthwise stride 2 to 4x4; 1x1 8->4; dense 4->5 (by hand, not from the zoo)."""
  layer = lambda **kw: Layer(**{'stride': 1, 'groups': 1, 'chain': None, 'b_max': 8, **kw})
  return Topology('tiny', 5, 3, (
      layer(name='conv', index=0, in_channels=3, out_channels=8, kernel=3, out_height=8, out_width=8,
            source=None, consumers=('dw',), chain='conv', b_max=32),
      layer(name='dw', index=1, in_channels=8, out_channels=8, kernel=3, stride=2, groups=8, out_height=4,
            out_width=4, source='conv', consumers=('pw',), chain='conv'),
      layer(name='pw', index=2, in_channels=8, out_channels=4, kernel=1, out_height=4, out_width=4,
            source='dw', consumers=('fc',))), head_source='pw', head_out_features=5, head_fixed_macs=0)


def test_hand_worked_three_layer_example():
  t = tiny_topology()
  keep = np.array([6, 6, 3])  # conv and dw lost 2 channels (one chain), pw lost 1
  w_bits, a_bits = np.array([32, 4, 2]), np.array([32, 8, 4])
  conv = 8 * 8 * 9 * 3 * 6  # 10368
  dw = 4 * 4 * 9 * 6  # 864: each kept channel is convolved alone
  pw = 4 * 4 * 1 * 6 * 3  # 288
  fc = 3 * 5  # 15
  np.testing.assert_array_equal(cost.layer_macs(t, keep), [10368, 864, 288])
  assert int(cost.flops(t, keep)) == conv + dw + pw + fc == 11535
  assert float(cost.bops(t, keep, w_bits, a_bits)) == (
      10368 * 32 * 32 + 864 * 4 * 8 + 288 * 2 * 4 + 15 * 32 * 32) == 10_662_144
  kernels = 9 * 3 * 6 + 9 * 6 + 6 * 3  # 162 + 54 + 18
  batch_norm = 2 * (6 + 6 + 3)
  dense_layer = 3 * 5 + 5  # kernel over the kept inputs, bias
  assert int(cost.params(t, keep)) == kernels + batch_norm + dense_layer == 284


def test_int_and_float_keep_agree_and_batch_axes_broadcast():
  t = get_topology('resnet20', 10, 32, 3)
  rng = np.random.default_rng(0)
  keep = rng.integers(1, cost.dense_keep(t) + 1, size=(3, 2, t.num_layers))
  as_int, as_float = cost.flops(t, keep), cost.flops(t, keep.astype(np.float32))
  assert as_int.shape == as_float.shape == (3, 2)
  np.testing.assert_array_equal(np.asarray(as_int, np.float64), np.asarray(as_float, np.float64))
  np.testing.assert_array_equal(cost.params(t, keep), cost.params(t, keep.astype(np.float32)))


def test_flops_bops_params_under_jit_and_vmap_equal_eager():
  t = get_topology('mobilenetv2', 100, 32, 3)  # has depthwise convs
  rng = np.random.default_rng(1)
  keep = rng.integers(1, cost.dense_keep(t) + 1, size=(5, t.num_layers)).astype(np.float32)
  w_bits = rng.integers(2, 9, size=t.num_layers)
  a_bits = rng.integers(2, 9, size=t.num_layers)
  eager_flops = np.array([float(cost.flops(t, k)) for k in keep])
  eager_bops = np.array([float(cost.bops(t, k, w_bits, a_bits)) for k in keep])
  eager_params = np.array([float(cost.params(t, k)) for k in keep])
  vmapped = jax.jit(jax.vmap(lambda k: (cost.flops(t, k), cost.bops(t, k, w_bits, a_bits), cost.params(t, k))))
  got = vmapped(keep)
  np.testing.assert_array_equal(got[0], eager_flops)
  np.testing.assert_array_equal(got[1], eager_bops)
  np.testing.assert_array_equal(got[2], eager_params)
  assert float(jax.jit(lambda k: cost.flops(t, k))(keep[0])) == eager_flops[0]


def test_pruning_a_chain_channel_lowers_every_member_and_consumer():
  t = get_topology('resnet20', 10, 32, 3)
  keep = cost.dense_keep(t).copy()
  for name in t.chains['stem']:  # channel 0 of the stem chain: stem and every conv2 lose one output
    keep[t.index(name)] -= 1
  # By hand: every conv loses what the removed channel cost as an output or as an input.
  saved = 0
  for l in t.layers:
    window = l.out_height * l.out_width * l.kernel ** 2
    c_in = 3 if l.source is None else t.layer(l.source).out_channels
    c_out = l.out_channels
    new_in = c_in - (l.source is not None and t.layer(l.source).chain == 'stem')
    new_out = c_out - (l.chain == 'stem')
    saved += window * (c_in * c_out - new_in * new_out)
  saved += 10  # the classifier reads the last conv2
  assert int(cost.flops(t, cost.dense_keep(t))) - int(cost.flops(t, keep)) == saved


def test_keep_counts_and_dense_keep():
  t = get_topology('resnet20', 10, 32, 3)
  np.testing.assert_array_equal(cost.dense_keep(t), [l.out_channels for l in t.layers])
  masks = {'stem': np.tile([1.0, 0.0] * 8, (2, 1)),  # batch of 2 candidates; the other layers are absent
           'layer3_2_conv1': np.tile(np.r_[np.ones(5), np.zeros(59)], (2, 1))}
  counts = cost.keep_counts(t, masks)
  assert counts.shape == (2, t.num_layers)
  expected = cost.dense_keep(t).astype(np.float32)
  expected[t.index('stem')] = 8
  expected[t.index('layer3_2_conv1')] = 5
  np.testing.assert_array_equal(counts, np.tile(expected, (2, 1)))
  with pytest.raises(ValueError, match='no prunable layer'):
    cost.keep_counts(t, {'conv9': np.ones(3)})
