"""Bit assignment from surviving weight magnitude (METHOD.md, "Bits")."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import bits as bits_lib
from picpq_jax import models, topology


def random_kernels(topo, seed=0):
  """params[name]['kernel'] of shape (k, k, in / groups, out) for every prunable conv, from numpy."""
  rng = np.random.default_rng(seed)
  return {l.name: {'kernel': rng.standard_normal((l.kernel, l.kernel, l.in_channels // l.groups,
                                                  l.out_channels)).astype(np.float32)}
          for l in topo.layers}


def reference_fraction(topo, params, masks):
  """s_l by zeroing the removed weights of a copy of the kernel (no index arithmetic shared with bits.py)."""
  out = {}
  for l in topo.layers:
    w = np.abs(np.asarray(params[l.name]['kernel'], np.float64))
    kept = w.copy()
    own = np.asarray(masks.get(l.name, np.ones(l.out_channels)))
    kept[..., own == 0] = 0.0
    if l.source is not None:
      src = np.asarray(masks.get(l.source, np.ones(l.in_channels)))
      if l.groups == 1:
        kept[:, :, src == 0, :] = 0.0
      else:  # depthwise: kernel (k, k, 1, C), channel c reads input channel c
        assert l.groups == l.in_channels == l.out_channels
        kept[:, :, 0, src == 0] = 0.0
    out[l.name] = kept.sum() / w.sum()
  return out


def random_masks(topo, rng, keep_prob):
  """One shared mask per chain (a member of width n gets chain_mask[:n]), free layers their own."""
  chain_masks, masks = {}, {}
  for l in topo.layers:
    if l.chain is not None:
      width = max(topo.layer(m).out_channels for m in topo.chains[l.chain])
      chain_masks.setdefault(l.chain, (rng.random(width) < keep_prob).astype(np.float32))
      masks[l.name] = chain_masks[l.chain][:l.out_channels]
    else:
      masks[l.name] = (rng.random(l.out_channels) < keep_prob).astype(np.float32)
  return masks


@pytest.fixture(scope='module')
def resnet20():
  return topology.get_topology('resnet20', 10, 8, 3)


B_MAX = {1: 8, 2: 6, 3: 4}  # ResNet stages 1..3 (METHOD.md); the stem is 32


def test_no_pruning_gives_b_max_and_stem_32(resnet20):
  bits = bits_lib.assign_bits(resnet20, random_kernels(resnet20), {})
  assert list(bits) == list(resnet20.names)
  assert bits['stem'] == 32
  for name, b in bits.items():
    if name != 'stem':
      assert b == B_MAX[int(name[5])], name
  # All-ones masks are "nothing removed" too.
  ones = {l.name: np.ones(l.out_channels) for l in resnet20.layers}
  assert bits_lib.assign_bits(resnet20, random_kernels(resnet20), ones) == bits


def test_hand_worked_half_pruned_layer(resnet20):
  """All-ones kernels, 8 of layer1_0_conv1's 16 filters removed: s = 0.5 for it (outputs) and for its
  consumer layer1_0_conv2 (inputs only), so both get 8 - ceil((1/6) / 0.5) = 7; everything else 8/6/4."""
  params = {l.name: {'kernel': np.ones((3, 3, l.in_channels, l.out_channels), np.float32)}
            for l in resnet20.layers}
  mask = np.array([1, 0] * 8, np.float32)
  s = bits_lib.surviving_fraction(resnet20, params, {'layer1_0_conv1': mask})
  assert s['layer1_0_conv1'] == 0.5 and s['layer1_0_conv2'] == 0.5 and s['layer1_1_conv1'] == 1.0
  bits = bits_lib.assign_bits(resnet20, params, {'layer1_0_conv1': mask})
  assert bits['layer1_0_conv1'] == 7 and bits['layer1_0_conv2'] == 7
  assert bits['layer1_1_conv1'] == 8 and bits['layer3_2_conv2'] == 4 and bits['stem'] == 32
  # lambda = 0 removes the penalty; lambda = 1 costs ceil(1 / 0.5) = 2 bits.
  assert bits_lib.assign_bits(resnet20, params, {'layer1_0_conv1': mask}, penalty=0.0)['layer1_0_conv1'] == 8
  assert bits_lib.assign_bits(resnet20, params, {'layer1_0_conv1': mask}, penalty=1.0)['layer1_0_conv1'] == 6


def test_pruned_stem_stays_32_and_lowers_its_consumers(resnet20):
  params = random_kernels(resnet20)
  mask = np.ones(16, np.float32)
  mask[:3] = 0  # input channels 0..2 of every conv reading the stem
  bits = bits_lib.assign_bits(resnet20, params, {'stem': mask})
  s = reference_fraction(resnet20, params, {'stem': mask})
  assert bits['stem'] == 32
  assert s['layer1_0_conv1'] < 1
  assert bits['layer1_0_conv1'] == 8 - math.ceil((1 / 6) / s['layer1_0_conv1'])
  assert bits['layer1_0_conv2'] == 8  # reads layer1_0_conv1, untouched


def test_heavy_pruning_clamps_to_min_bits(resnet20):
  params = random_kernels(resnet20)
  mask = np.zeros(64, np.float32)
  mask[:4] = 1  # 4 of 64 filters: s ~ 1/16, 4 - ceil(~2.7) = 1 -> clamped
  bits = bits_lib.assign_bits(resnet20, params, {'layer3_1_conv1': mask})
  assert bits['layer3_1_conv1'] == 2 and bits['layer3_1_conv2'] == 2
  assert bits_lib.assign_bits(resnet20, params, {'layer3_1_conv1': mask}, min_bits=1)['layer3_1_conv1'] == 1
  # Everything removed (s = 0) also gives min_bits rather than dividing by zero.
  assert bits_lib.assign_bits(resnet20, params, {'layer3_1_conv1': np.zeros(64)})['layer3_1_conv1'] == 2


def test_removed_zero_filter_counts_as_pruned(resnet20):
  """s == 1.0 exactly, yet a filter was removed: the masks decide, so the layer pays ceil(lambda / 1) = 1."""
  params = random_kernels(resnet20)
  params['layer2_1_conv1']['kernel'][..., 5] = 0.0
  mask = np.ones(32, np.float32)
  mask[5] = 0
  s = bits_lib.surviving_fraction(resnet20, params, {'layer2_1_conv1': mask})
  assert s['layer2_1_conv1'] == 1.0
  assert bits_lib.assign_bits(resnet20, params, {'layer2_1_conv1': mask})['layer2_1_conv1'] == 6 - 1


@pytest.mark.parametrize('arch', ['resnet20', 'mobilenetv2'])
def test_random_masks_match_independent_reference(arch):
  topo = topology.get_topology(arch, 10, 8, 3)
  rng = np.random.default_rng(3)
  params = random_kernels(topo, seed=4)
  masks = random_masks(topo, rng, keep_prob=0.7)
  masks[topo.layers[3].name] = np.ones(topo.layers[3].out_channels, np.float32)  # a layer with no own loss
  s_ref = reference_fraction(topo, params, masks)
  s = bits_lib.surviving_fraction(topo, params, masks)
  bits = bits_lib.assign_bits(topo, params, masks)
  for l in topo.layers:
    np.testing.assert_allclose(s[l.name], s_ref[l.name], rtol=1e-12, err_msg=l.name)
    if l.source is None:
      expected = 32
    elif s_ref[l.name] == 1.0 or l.b_max == 32:  # random normal weights: s == 1 only when nothing was removed
      expected = l.b_max  # (B_max 32, MobileNetV2's last conv: full precision even when pruned)
    else:
      expected = min(max(l.b_max - math.ceil((1 / 6) / s_ref[l.name]), 2), l.b_max)
    assert bits[l.name] == expected, l.name
  assert len(set(bits.values())) > 2  # the masks really produced a spread of bits


def test_b_max_32_means_full_precision_even_when_pruned():
  """MobileNetV2's last 1x1 conv has B_max 32 (the original keeps it in floating point): half of its filters
  removed still gives 32, where the rule would give 32 - ceil((1/6) / s) = 31; a layer with B_max 6 pruned
  the same way pays the penalty."""
  topo = topology.get_topology('mobilenetv2', 10, 8, 3)
  params = random_kernels(topo)
  assert topo.layer('last_conv').b_max == 32 and topo.layer('block1_project').b_max == 6
  half = np.array([1, 0] * 640, np.float32)
  s = reference_fraction(topo, params, {'last_conv': half})['last_conv']
  assert 0.3 < s < 0.7 and 32 - math.ceil((1 / 6) / s) == 31
  bits = bits_lib.assign_bits(topo, params, {'last_conv': half, 'block1_project': np.array([1, 0] * 12)})
  assert bits['last_conv'] == 32 and bits['block1_project'] == 6 - 1  # s ~ 0.5: ceil((1/6) / s) = 1
  traced = bits_lib.assign_bits_traced(topo, params, {'last_conv': half})
  assert int(traced['last_conv']) == 32


def test_b_max_override(resnet20):
  params = random_kernels(resnet20)
  bits = bits_lib.assign_bits(resnet20, params, {}, b_max={'layer1_0_conv1': 5})
  assert bits['layer1_0_conv1'] == 5 and bits['layer1_0_conv2'] == 8
  table = np.full(resnet20.num_layers, 3)
  bits = bits_lib.assign_bits(resnet20, params, {}, b_max=table)
  assert bits['stem'] == 32 and set(list(bits.values())[1:]) == {3}


def test_errors_name_the_layer_or_value(resnet20):
  params = random_kernels(resnet20)
  with pytest.raises(ValueError, match='layer9_conv'):
    bits_lib.assign_bits(resnet20, params, {'layer9_conv': np.ones(16)})
  with pytest.raises(ValueError, match=r"masks\['stem'\] must be 16 values"):
    bits_lib.assign_bits(resnet20, params, {'stem': np.ones(15)})
  with pytest.raises(ValueError, match='min_bits = 0'):
    bits_lib.assign_bits(resnet20, params, {}, min_bits=0)
  with pytest.raises(ValueError, match=r"b_max\['layer2_0_conv1'\] = 33"):
    bits_lib.assign_bits(resnet20, params, {}, b_max={'layer2_0_conv1': 33})
  with pytest.raises(ValueError, match='layer9_conv'):
    bits_lib.assign_bits(resnet20, params, {}, b_max={'layer9_conv': 4})
  with pytest.raises(ValueError, match='penalty'):
    bits_lib.assign_bits(resnet20, params, {}, penalty=-0.1)


def test_validate_bits(resnet20):
  bits_lib.validate_bits(resnet20, {'stem': 32, 'layer1_0_conv1': (4, 8), 'layer3_2_conv2': np.int32(1)})
  with pytest.raises(ValueError, match='layer9_conv'):
    bits_lib.validate_bits(resnet20, {'layer9_conv': 4})
  for bad in (0, 33, 4.5, (4, 0)):
    with pytest.raises(ValueError, match=r"bits\['layer1_0_conv1'\]"):
      bits_lib.validate_bits(resnet20, {'layer1_0_conv1': bad})


def test_bits_tree_feeds_the_model():
  spec = models.get_spec('resnet20', 10, 8, 3)
  topo = topology.topology_from_spec(spec)
  params = random_kernels(topo)
  bits = bits_lib.assign_bits(topo, params, {'layer2_0_conv1': np.array([0, 1] * 16)})
  tree = bits_lib.bits_tree(bits)
  assert set(tree) == set(topo.names)
  assert tree['layer2_0_conv1'].dtype == jnp.int32 and tree['layer2_0_conv1'].shape == (2,)
  np.testing.assert_array_equal(tree['layer2_0_conv1'], [bits['layer2_0_conv1']] * 2)
  np.testing.assert_array_equal(tree['stem'], [32, 32])
  with pytest.raises(ValueError, match=r"bits\['stem'\]"):
    bits_lib.bits_tree({'stem': 0})
  # The tree is what Net.apply takes: a forward pass with it runs and gives finite logits.
  shapes = jax.eval_shape(lambda: models.Net(spec).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype) * 0.1, shapes)
  logits = jax.jit(lambda v, x, b: models.Net(spec).apply(v, x, train=False, bits=b))(
      variables, jnp.ones((2, 8, 8, 3)), tree)
  assert logits.shape == (2, 10) and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize('arch', ['resnet20', 'mobilenetv2'])
def test_traced_bits_equal_host_bits(arch):
  """The jitted twin used inside the search gives the host rule's bits on random chain-respecting masks."""
  import jax  # pylint: disable=g-import-not-at-top
  from picpq_jax.testing import random_masks  # pylint: disable=g-import-not-at-top
  topo = topology.get_topology(arch, 10, 16, 3)
  rng = np.random.default_rng(7)
  params = {l.name: {'kernel': rng.normal(size=(l.kernel, l.kernel, l.in_channels // l.groups,
                                                l.out_channels)).astype(np.float32)} for l in topo.layers}
  for keep_prob in (0.3, 0.7, 1.0):
    masks = random_masks(topo, rng, keep_prob)
    expected = bits_lib.assign_bits(topo, params, masks)
    traced = jax.jit(lambda p, m: bits_lib.assign_bits_traced(topo, p, m))(params, masks)
    assert {k: int(v) for k, v in traced.items()} == expected
