"""Tests of cost.py against known answers worked out independently of its code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import cost, models, pruning
from picpq_jax.testing import random_masks
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


# --------------------------------------------------------------------------------------------------------
# Sparse BOPs and weight bits (BASELINES.md, "A common cost ledger")
# --------------------------------------------------------------------------------------------------------


def two_layer_topology():
  """3x3 conv 'a' 2->3 at 4x4; 1x1 conv 'b' 3->2 at 4x4 reading 'a'; dense 2->4 reading 'b' (by hand)."""
  layer = lambda **kw: Layer(**{'stride': 1, 'groups': 1, 'chain': None, 'b_max': 8, **kw})
  return Topology('two', 4, 2, (
      layer(name='a', index=0, in_channels=2, out_channels=3, kernel=3, out_height=4, out_width=4, source=None,
            consumers=('b',)),
      layer(name='b', index=1, in_channels=3, out_channels=2, kernel=1, out_height=4, out_width=4, source='a',
            consumers=('fc',))), head_source='b', head_out_features=4, head_fixed_macs=0)


def weight_masks_with_pruned_channels_zeroed(topology, weight_masks, channel_masks):
  """The weight masks with the entries of pruned channels zeroed by pruning's one rule."""
  params = {name: {'kernel': jnp.asarray(m, jnp.float32), 'bn': {}} for name, m in weight_masks.items()}
  zeroed = pruning.zero_pruned_weights(topology, params, channel_masks)
  return {name: zeroed[name]['kernel'] for name in weight_masks}


def test_hand_worked_sparse_bops_and_weight_bits():
  t = two_layer_topology()
  channel_masks = {'a': np.array([1.0, 1.0, 0.0])}  # a loses output channel 2, so b loses input channel 2
  keep = cost.keep_counts(t, channel_masks)
  np.testing.assert_array_equal(keep, [2, 2])
  mask_a = np.ones((3, 3, 2, 3))
  mask_a[0, :, 0, 0] = 0  # 3 entries of a kept filter
  mask_a[1, 1, 1, 1] = 0
  mask_a[2, 2, :, 1] = 0  # 2 more: 6 zeros in the kept filters 0 and 1
  mask_a[:, :, 0, 2] = 0  # 9 zeros in the pruned filter 2: they were removed with it, not by the mask
  mask_b = np.ones((1, 1, 3, 2))
  mask_b[0, 0, 0, 1] = 0  # one zero among the kept (input 0..1) x (output 0..1) entries
  mask_b[0, 0, 2, 0] = 0  # input 2 is pruned: already removed
  weight_masks = {'a': mask_a, 'b': mask_b}
  nonzero = cost.nonzero_weights(t, channel_masks, weight_masks)  # as they are: the channel rule applies
  zeroed = weight_masks_with_pruned_channels_zeroed(t, weight_masks, channel_masks)
  np.testing.assert_array_equal(cost.nonzero_weights(t, channel_masks, zeroed), nonzero)
  # a: 3 * 3 * 2 inputs * 2 kept outputs = 36 entries, 6 zeros; b: 1 * 1 * 2 * 2 = 4 entries, 1 zero.
  np.testing.assert_array_equal(cost.kernel_entries(t, keep), [36, 4])
  np.testing.assert_array_equal(nonzero, [30, 3])
  np.testing.assert_allclose(cost.density(t, keep, nonzero), [30 / 36, 3 / 4], rtol=2 ** -23)
  w_bits, a_bits = np.array([8, 4]), np.array([8, 2])
  macs_a, macs_b, macs_fc = 4 * 4 * 9 * 2 * 2, 4 * 4 * 1 * 2 * 2, 2 * 4  # 576, 64, 8
  dense_bops = macs_a * 8 * 8 + macs_b * 4 * 2 + macs_fc * 32 * 32
  sparse = macs_a * 30 / 36 * 8 * 8 + macs_b * 3 / 4 * 4 * 2 + macs_fc * 32 * 32  # 480 and 48 effective MACs
  assert dense_bops == 36864 + 512 + 8192 == 45568
  assert sparse == 30720 + 384 + 8192 == 39296
  assert float(cost.bops(t, keep, w_bits, a_bits)) == dense_bops
  # density 30/36 is rounded in float32; a few roundings of the total are the tolerance.
  assert float(cost.sparse_bops(t, keep, nonzero, w_bits, a_bits)) == pytest.approx(sparse, rel=4 * 2 ** -23)
  # weight bits: 30 weights at 8 bits, 3 at 4, the classifier's 2 x 4 kernel at 32 (its bias is not a weight).
  assert float(cost.weight_bits(t, keep, nonzero, w_bits)) == 30 * 8 + 3 * 4 + 8 * 32 == 508


def test_a_layer_without_weight_mask_is_dense_within_its_kept_channels():
  t = two_layer_topology()
  channel_masks = {'a': np.array([1.0, 0.0, 1.0]), 'b': np.array([0.0, 1.0])}
  keep = np.array([2.0, 1.0])
  np.testing.assert_array_equal(cost.nonzero_weights(t, channel_masks, {}), cost.kernel_entries(t, keep))
  np.testing.assert_array_equal(cost.kernel_entries(t, keep), [9 * 2 * 2, 1 * 2 * 1])
  with pytest.raises(ValueError, match='no prunable layer'):
    cost.nonzero_weights(t, channel_masks, {'c': np.ones((1, 1, 1, 1))})


@pytest.mark.parametrize('arch,classes,size', [('resnet20', 10, 32), ('mobilenetv2', 100, 32)])
def test_sparse_bops_equal_bops_with_all_ones_weight_masks(arch, classes, size):
  t = get_topology(arch, classes, size, 3)
  rng = np.random.default_rng(2)
  # Chain-respecting masks (as every policy's are): a depthwise conv's filter goes with its input channel, so
  # the kernel entries the channel rule keeps are exactly `kernel_entries`.
  channel_masks = random_masks(t, rng, keep_prob=0.7)
  keep = cost.keep_counts(t, channel_masks)
  ones = {l.name: np.ones((l.kernel, l.kernel, 1 if l.depthwise else l.in_channels // l.groups, l.out_channels))
          for l in t.layers}
  count = jax.jit(lambda ones, channel_masks: cost.nonzero_weights(  # jit: one dispatch, not hundreds
      t, channel_masks, ones))
  nonzero = count(ones, channel_masks)
  np.testing.assert_array_equal(nonzero, cost.kernel_entries(t, keep))
  np.testing.assert_array_equal(cost.density(t, keep, nonzero), np.ones(t.num_layers))
  w_bits = rng.integers(2, 9, size=t.num_layers)
  a_bits = rng.integers(2, 9, size=t.num_layers)
  assert float(cost.sparse_bops(t, keep, nonzero, w_bits, a_bits)) == float(cost.bops(t, keep, w_bits, a_bits))


@pytest.mark.parametrize('arch,classes,size', [('resnet20', 10, 32), ('vgg16', 10, 32), ('mobilenetv2', 100, 32)])
def test_dense_fp32_weight_bits_are_32_times_the_kernel_entries(arch, classes, size):
  """Weight bits count conv and dense kernels only: 32 x (cost.params - BatchNorm scales and biases - dense
  biases), i.e. 32 x the entries of the Flax model's `kernel` leaves."""
  t = get_topology(arch, classes, size, 3)
  model = models.create_model(arch, classes, size, 3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  leaves = jax.tree_util.tree_flatten_with_path(shapes['params'])[0]
  kernels = sum(int(np.prod(leaf.shape)) for path, leaf in leaves if path[-1].key == 'kernel')
  keep = dense(t)
  bits = np.full(t.num_layers, 32)
  got = float(cost.weight_bits(t, keep, cost.nonzero_weights(t, {}, {}), bits))
  # float32 sum of L terms: at most L roundings of half an ulp of the total.
  assert got == pytest.approx(32 * kernels, rel=t.num_layers * 2 ** -24)
  others = sum(int(np.prod(leaf.shape)) for path, leaf in leaves if path[-1].key != 'kernel')
  assert int(cost.params(t, cost.dense_keep(t))) == kernels + others


def test_hand_worked_weight_bits_relation_to_params():
  t = tiny_topology()  # 3 convs and one dense layer with a bias
  keep = np.array([6, 6, 3])
  bits = np.full(t.num_layers, 32)
  chain = np.array([1, 1, 0, 1, 1, 1, 0, 1])  # conv and dw keep 6 of 8 (one chain), pw 3 of 4
  nonzero = cost.nonzero_weights(t, {'conv': chain, 'dw': chain, 'pw': np.array([1, 0, 1, 1])}, {})
  params = int(cost.params(t, keep))  # 284: kernels 234 + BatchNorm 2 * 15 + dense kernel 15 + bias 5
  assert float(cost.weight_bits(t, keep, nonzero, bits)) == 32 * (params - 2 * keep.sum() - 5) == 32 * 249


def test_sparse_bops_and_weight_bits_under_jit_and_vmap_equal_eager():
  t = get_topology('mobilenetv2', 100, 32, 3)
  rng = np.random.default_rng(3)
  keep = rng.integers(1, cost.dense_keep(t) + 1, size=(4, t.num_layers)).astype(np.float32)
  nonzero = np.floor(np.asarray(cost.kernel_entries(t, keep)) * rng.uniform(0.1, 1.0, size=keep.shape))
  w_bits = rng.integers(2, 9, size=t.num_layers)
  a_bits = rng.integers(2, 9, size=t.num_layers)
  f = lambda k, n: (cost.sparse_bops(t, k, n, w_bits, a_bits), cost.weight_bits(t, k, n, w_bits))
  eager = [np.array([float(f(k, n)[i]) for k, n in zip(keep, nonzero)]) for i in range(2)]
  got = jax.jit(jax.vmap(f))(keep, nonzero)
  np.testing.assert_array_equal(got[0], eager[0])
  np.testing.assert_array_equal(got[1], eager[1])
  batched = f(keep, nonzero)  # leading axes broadcast without vmap too
  np.testing.assert_array_equal(batched[0], eager[0])
  assert np.all(eager[0] <= np.asarray(cost.bops(t, keep, w_bits, a_bits)))
