"""The one rule for which kernel entries a channel mask removes (topology.kernel_keep / kernel_mask), worked by
hand on a grouped conv that is neither plain nor depthwise, and the callers that share it: the bit assignment,
the zeroing of pruned weights, the cost ledger's weight counts and the export's slicing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import bits as bits_lib
from picpq_jax import cost, export, models, pruning, topology
from picpq_jax.models.spec import BlockSpec, ArchSpec, ConvSpec, DenseSpec
from picpq_jax.testing import random_variables

# A 1x1 stem 'a' (image 2 -> 4 channels), then 'g': a 1x1 conv 4 -> 6 in 2 groups (kernel (1, 1, 2, 6)),
# read by the classifier. Filters 0..2 of g are group 0 and read inputs 0, 1; filters 3..5 read inputs 2, 3.
SPEC = ArchSpec(
    arch='toy_grouped', num_classes=3, image_size=4, in_channels=2,
    convs=(ConvSpec('a', 2, 4, kernel=1, stride=1, in_size=4, out_size=4, source=None, b_max=32),
           ConvSpec('g', 4, 6, kernel=1, stride=1, in_size=4, out_size=4, source='a', b_max=8, groups=2)),
    blocks=(BlockSpec('conv', ('a',)), BlockSpec('conv', ('g',))),
    head=(DenseSpec('classifier', 6, 3, source='g'),))
TOPO = topology.topology_from_spec(SPEC)
MASKS = {'a': np.array([1, 0, 1, 1], np.float32), 'g': np.array([1, 1, 0, 1, 1, 1], np.float32)}
# Entry (i, o) of g reads input channel (o // 3) * 2 + i:
READS = [[0, 0, 0, 2, 2, 2],
         [1, 1, 1, 3, 3, 3]]
# ... so it is removed when filter o is (o = 2) or that input is (input 1: row i = 1 of filters 0..2).
G_MASK = [[1, 1, 0, 1, 1, 1],
          [0, 0, 0, 1, 1, 1]]


def test_hand_worked_grouped_conv():
  g = TOPO.layer('g')
  assert (g.groups, g.in_channels, g.out_channels) == (2, 4, 6) and not g.depthwise
  np.testing.assert_array_equal(topology.kernel_input_channels(g), READS)
  in_keep, out_keep = topology.kernel_keep(TOPO, MASKS, 'g')
  np.testing.assert_array_equal(in_keep, [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(out_keep, MASKS['g'])
  mask = topology.kernel_mask(TOPO, MASKS, 'g')
  assert mask.shape == (1, 1, 2, 6)
  np.testing.assert_array_equal(mask[0, 0], G_MASK)


def test_the_stem_reads_the_image_and_absent_layers_keep_everything():
  np.testing.assert_array_equal(topology.kernel_mask(TOPO, MASKS, 'a')[0, 0],
                                np.ones((2, 1)) * MASKS['a'])  # only its own mask
  np.testing.assert_array_equal(topology.kernel_mask(TOPO, {}, 'g'), np.ones((1, 1, 2, 6)))
  only_input = topology.kernel_mask(TOPO, {'a': MASKS['a']}, 'g')[0, 0]
  np.testing.assert_array_equal(only_input, [[1] * 6, [0, 0, 0, 1, 1, 1]])


def test_plain_and_depthwise_are_special_cases():
  layer = lambda **kw: topology.Layer(**{'stride': 1, 'chain': None, 'b_max': 8, 'kernel': 3, 'out_height': 2,
                                         'out_width': 2, **kw})
  t = topology.Topology('toy', 2, 3, (
      layer(name='s', index=0, in_channels=3, out_channels=4, groups=1, source=None, consumers=('d',)),
      layer(name='d', index=1, in_channels=4, out_channels=4, groups=4, source='s', consumers=('p',)),
      layer(name='p', index=2, in_channels=4, out_channels=2, groups=1, source='d', consumers=('fc',))),
      head_source='p', head_out_features=2, head_fixed_macs=0)
  keep = {'s': np.array([1, 0, 1, 1]), 'd': np.array([1, 1, 0, 1]), 'p': np.array([0, 1])}
  # depthwise: entry (0, o) reads channel o, so it goes when d's or s's channel o goes.
  np.testing.assert_array_equal(topology.kernel_mask(t, keep, 'd')[0, 0], [[1, 0, 0, 1]])
  # plain: entry (i, o) reads channel i.
  np.testing.assert_array_equal(topology.kernel_mask(t, keep, 'p')[0, 0], np.outer([1, 1, 0, 1], [0, 1]))


def test_traced_batched_masks():
  batch = {k: jnp.stack([jnp.asarray(v), jnp.ones_like(v)]) for k, v in MASKS.items()}
  got = jax.jit(lambda m: topology.kernel_mask(TOPO, m, 'g'))(batch)
  assert got.shape == (2, 1, 1, 2, 6)
  np.testing.assert_array_equal(got[0, 0, 0], G_MASK)
  np.testing.assert_array_equal(got[1], np.ones((1, 1, 2, 6)))


def test_a_mask_of_the_wrong_width_is_a_value_error():
  with pytest.raises(ValueError, match="'a'"):
    topology.kernel_keep(TOPO, {'a': np.ones(3)}, 'g')


# The callers, each on the grouped conv.


def test_bits_count_the_rule():
  params = {name: {'kernel': np.ones((1, 1, l.in_channels // l.groups, l.out_channels), np.float32)}
            for name, l in ((l.name, l) for l in TOPO.layers)}
  s = bits_lib.surviving_fraction(TOPO, params, MASKS)
  assert s['g'] == np.mean(G_MASK) == 8 / 12
  assert s['a'] == 3 / 4
  traced = jax.jit(lambda p, m: bits_lib.assign_bits_traced(TOPO, p, m))(params, MASKS)
  assert {k: int(v) for k, v in traced.items()} == bits_lib.assign_bits(TOPO, params, MASKS)
  keep = bits_lib.keep_vectors(TOPO, {'a': MASKS['a']})
  assert not bits_lib.nothing_removed(TOPO, keep, TOPO.layer('g'))  # an input channel went
  assert bits_lib.nothing_removed(TOPO, bits_lib.keep_vectors(TOPO, {}), TOPO.layer('g'))


def test_zero_pruned_weights_zeroes_the_rule():
  rng = np.random.default_rng(0)
  params = {l.name: {'kernel': rng.normal(size=(1, 1, l.in_channels // l.groups, l.out_channels)),
                     'bn': {'scale': np.ones(l.out_channels), 'bias': np.ones(l.out_channels)}}
            for l in TOPO.layers}
  out = pruning.zero_pruned_weights(TOPO, params, MASKS)
  np.testing.assert_allclose(out['g']['kernel'][0, 0], params['g']['kernel'][0, 0] * np.array(G_MASK))
  np.testing.assert_array_equal(out['g']['bn']['scale'], MASKS['g'])


def test_nonzero_weights_apply_the_rule_to_raw_weight_masks():
  weight_masks = {'g': np.ones((1, 1, 2, 6))}
  weight_masks['g'][0, 0, 0, 3] = 0  # one zero among the kept entries
  weight_masks['g'][0, 0, 1, 0] = 0  # one where input 1 was pruned anyway
  nonzero = cost.nonzero_weights(TOPO, MASKS, weight_masks)
  np.testing.assert_array_equal(nonzero, [1 * 1 * 2 * 3, np.sum(G_MASK) - 1])


def test_export_slices_what_the_rule_keeps_and_the_slim_model_agrees():
  masks = {'a': np.array([1, 0, 0, 1], np.float32), 'g': np.array([0, 1, 1, 1, 0, 1], np.float32)}
  keep = export.kept_indices(SPEC, masks)
  variables = random_variables(SPEC)
  slim = export.slice_variables(SPEC, variables, keep)
  kernel = variables['params']['g']['kernel']
  # Kept filters 1, 2 read input 0 (group 0) and 3, 5 read input 3 (group 1): row 0 resp. row 1 of each.
  np.testing.assert_array_equal(slim['params']['g']['kernel'][0, 0],
                                [[kernel[0, 0, 0, 1], kernel[0, 0, 0, 2], kernel[0, 0, 1, 3], kernel[0, 0, 1, 5]]])
  slim_spec = export.slim_spec(SPEC, keep)
  assert (slim_spec.conv('g').in_channels, slim_spec.conv('g').out_channels, slim_spec.conv('g').groups) == (2, 4, 2)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
  masked = models.Net(SPEC).apply(variables, x, masks={k: jnp.asarray(v) for k, v in masks.items()})
  np.testing.assert_allclose(models.Net(slim_spec).apply(slim, x), masked, atol=1e-5, rtol=1e-5)


def test_export_refuses_groups_that_keep_different_numbers():
  masks = {'a': np.array([1, 1, 0, 1], np.float32), 'g': np.ones(6, np.float32)}
  with pytest.raises(ValueError, match="'g'"):
    export.slice_variables(SPEC, random_variables(SPEC), export.kept_indices(SPEC, masks))
