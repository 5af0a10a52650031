"""Tests of pruning.py: the jitted global ranking against a plain-Python reference of METHOD.md's procedure.

The reference below shares nothing with pruning.py but the topology table: it walks layers and items with
Python loops and dicts and counts MACs with Python ints. Candidates use values whose float32 arithmetic
is exact (integers, multiples of 1/4, a with 16 significant bits), so both sides see the very same
importances and ties, whether or not XLA fuses a * fp + b into one rounding.
"""
import functools
import math

import jax
import numpy as np
import pytest

from picpq_jax import cost, pruning
from picpq_jax.topology import Layer, Topology, get_topology

F32 = np.float32


# ---------------------------------------------------------------------------------------------------------
# Reference implementation (Python loops, dicts, Python ints).

def reference_macs(topology, keep):
  """MACs of kept counts `keep` (dict name -> int), from METHOD.md's formula."""
  total = 0
  for layer in topology.layers:
    window = layer.out_height * layer.out_width * layer.kernel * layer.kernel
    if layer.depthwise:
      total += window * keep[layer.name]
    else:
      c_in = topology.in_channels if layer.source is None else keep[layer.source]
      total += window * c_in * keep[layer.name] // layer.groups
  return total + keep[topology.head_source] * topology.head_out_features + topology.head_fixed_macs


def reference_quota(n, safeguard):
  if safeguard == 0:
    return n - 1
  return max(0, min(math.floor(n * (1 - safeguard)), n - 2))


def reference_items(topology, fp, a, b):
  """[(value, [member layer names that have the channel], group name, channel)] in pre-sort order."""
  items, done = [], set()
  for li, layer in enumerate(topology.layers):
    if layer.chain is None:
      for j in range(layer.out_channels):
        items.append((F32(a[li]) * F32(fp[li][j]) + F32(b[li]), [layer.name], layer.name, j))
    elif layer.chain not in done:
      done.add(layer.chain)
      members = [m for m in topology.layers if m.chain == layer.chain]
      for j in range(max(m.out_channels for m in members)):
        value, having = F32(0), []
        for m in members:  # forward order; narrower members contribute nothing
          if j < m.out_channels:
            value = value + (F32(a[m.index]) * F32(fp[m.index][j]) + F32(b[m.index]))
            having.append(m.name)
        items.append((value, having, layer.chain, j))
  return items


def reference_prune(topology, fp, a, b, keep_fraction, safeguard, check_every):
  """METHOD.md's greedy walk. Returns (masks by group, keep by layer, sorted items, removed positions)."""
  items = reference_items(topology, fp, a, b)
  ranked = sorted(items, key=lambda item: item[0])  # Python's sort is stable
  keep = {l.name: l.out_channels for l in topology.layers}
  quota = {l.name: reference_quota(l.out_channels, safeguard) for l in topology.layers}
  target = keep_fraction * reference_macs(topology, keep)
  removed = []
  for position, (_, having, group, channel) in enumerate(ranked):
    if all(quota[name] > 0 for name in having):
      for name in having:
        quota[name] -= 1
        keep[name] -= 1
      removed.append(position)
    if position % check_every == 0 and reference_macs(topology, keep) < target:
      break
  group_masks = {}
  for _, _, group, channel in items:
    group_masks.setdefault(group, []).append(1.0)
  for position in removed:
    _, _, group, channel = ranked[position]
    group_masks[group][channel] = 0.0
  return group_masks, keep, ranked, removed, target


def layer_mask(topology, group_masks, name):
  layer = topology.layer(name)
  return np.array(group_masks[layer.chain or name][:layer.out_channels], np.float32)


# ---------------------------------------------------------------------------------------------------------
# Candidates whose float32 importances are exact.

def draw_candidate(topology, rng, style):
  """(fp list, a, b) of one style: 'ties' (small integers), 'identity' (a=1, b=0, integer ranks),
  'quarters' (multiples of 1/4) or 'search' (a = exp(N(0, 1)) to 16 bits, b ~ N(0, std), float32)."""
  widths = [l.out_channels for l in topology.layers]
  num_layers = topology.num_layers
  if style == 'ties':
    fp = [rng.integers(0, 4, n).astype(F32) for n in widths]
    return fp, rng.integers(1, 4, num_layers).astype(F32), rng.integers(-2, 3, num_layers).astype(F32)
  fp = [rng.integers(0, 33, n).astype(F32) for n in widths]  # ranks of maps up to 32x32
  if style == 'identity':
    return fp, np.ones(num_layers, F32), np.zeros(num_layers, F32)
  if style == 'quarters':
    fp = [f + rng.integers(0, 4, f.shape) / 4 for f in fp]
    return fp, rng.integers(1, 16, num_layers) / 4, rng.integers(-40, 41, num_layers) / 4
  mantissa, exponent = np.frexp(np.exp(rng.standard_normal(num_layers)))
  a = np.ldexp(np.round(mantissa * 2 ** 16) / 2 ** 16, exponent).astype(F32)  # a * integer fp is exact
  b = (rng.standard_normal(num_layers) * np.array([np.std(f) for f in fp])).astype(F32)
  return fp, a, b


STYLES = ('ties', 'identity', 'quarters', 'search')

@functools.lru_cache(maxsize=None)
def topo(arch, classes=10, size=32):
  return get_topology(arch, classes, size, 3)


# (arch, keep_fraction, safeguard, check_every, reached): 13 configurations x 4 candidates = 52 cases.
# Tiny keep fractions exhaust the quotas and leave the target unreached.
CONFIGS = [
    ('resnet20', 0.5, 0.1, 1, True), ('resnet20', 0.3, 0.0, 10, True), ('resnet20', 0.02, 0.3, 1, False),
    ('resnet56', 0.45, 0.1, 1, True), ('resnet56', 0.45, 0.1, 10, True), ('resnet56', 0.7, 0.3, 1, True),
    ('resnet56', 0.03, 0.1, 10, False),
    ('vgg16', 0.347, 0.1, 1, True), ('vgg16', 0.2, 0.0, 10, True), ('vgg16', 0.01, 0.3, 1, False),
    ('mobilenetv2', 0.5, 0.1, 1, True), ('mobilenetv2', 0.05, 0.0, 10, True),
    ('mobilenetv2', 0.05, 0.3, 1, False),
]


@pytest.mark.parametrize('arch,keep_fraction,safeguard,check_every,expect_reached', CONFIGS)
def test_jitted_vmapped_core_matches_reference(arch, keep_fraction, safeguard, check_every, expect_reached):
  t = topo(arch, 100 if arch == 'mobilenetv2' else 10)
  rng = np.random.default_rng(CONFIGS.index((arch, keep_fraction, safeguard, check_every, expect_reached)))
  candidates = [draw_candidate(t, rng, style) for style in STYLES]
  fp_padded = np.stack([pruning.pad_filter_properties(t, c[0]) for c in candidates])
  a = np.stack([c[1] for c in candidates])
  b = np.stack([c[2] for c in candidates])
  # fp differs per candidate here, so vmap over it too (prune_masks_batched shares one fp).
  settings = dict(keep_fraction=keep_fraction, safeguard=safeguard, check_every=check_every)
  prune = jax.vmap(lambda f, a_, b_: pruning.prune_masks(t, f, a_, b_, **settings))
  masks, info = jax.tree.map(np.asarray, prune(fp_padded, a, b))
  for p, (fp, a_p, b_p) in enumerate(candidates):
    groups, keep, ranked, removed, target = reference_prune(t, fp, a_p, b_p, **settings)
    for layer in t.layers:
      np.testing.assert_array_equal(masks[layer.name][p], layer_mask(t, groups, layer.name),
                                    err_msg=f'{arch} candidate {p} ({STYLES[p]}) layer {layer.name}')
    final = reference_macs(t, keep)
    np.testing.assert_array_equal(info['keep'][p], [keep[l.name] for l in t.layers])
    assert int(info['num_removed'][p]) == len(removed)
    assert int(info['last_removed'][p]) == (removed[-1] if removed else -1)
    assert bool(info['reached'][p]) == (final < target) == expect_reached
    assert float(info['flops'][p]) == pytest.approx(final, rel=1e-6)
    if final < target:  # the masks meet the target
      assert float(cost.flops(t, cost.keep_counts(t, {n: m[p] for n, m in masks.items()}))) < target
    else:  # unreachable: every removable item went, so every free layer spent its whole quota
      for layer in t.layers:
        if layer.chain is None:
          assert keep[layer.name] == layer.out_channels - reference_quota(layer.out_channels, safeguard)
    if check_every == 1 and final < target and len(removed) > 0:
      # Minimal stop: putting the last removed item back leaves the cost at or above the target.
      back = dict(keep)
      for name in ranked[removed[-1]][1]:
        back[name] += 1
      assert reference_macs(t, back) >= target


def test_batched_candidates_match_single_calls():
  t = topo('resnet56')
  rng = np.random.default_rng(5)
  fp = draw_candidate(t, rng, 'identity')[0]
  fp_padded = pruning.pad_filter_properties(t, fp)
  pairs = [draw_candidate(t, rng, 'search')[1:] for _ in range(3)] + [draw_candidate(t, rng, 'ties')[1:]]
  a, b = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
  masks, info = pruning.prune_masks_batched(t, fp_padded, a, b, 0.45, safeguard=0.1, check_every=1)
  single = jax.jit(lambda a_, b_: pruning.prune_masks(t, fp_padded, a_, b_, 0.45, 0.1, 1))  # jittable
  for p in range(len(pairs)):
    one_masks, one_info = single(a[p], b[p])
    for name in one_masks:
      np.testing.assert_array_equal(masks[name][p], one_masks[name])
    for key in one_info:
      np.testing.assert_array_equal(info[key][p], one_info[key])


def test_exact_stop_past_2_31_macs():
  """ResNet-18 at 320x320 has 3.7 G MACs, past int32: the stop decision must stay exact."""
  t = topo('resnet18', 1000, 320)
  assert pruning.exact_flops(t, cost.dense_keep(t)) > 2 ** 31
  rng = np.random.default_rng(7)
  for style in ('search', 'ties'):
    fp, a, b = draw_candidate(t, rng, style)
    masks, info = pruning.global_prune(t, fp, a, b, 0.5, safeguard=0.1, check_every=1)
    groups, keep, ranked, removed, target = reference_prune(t, fp, a, b, 0.5, 0.1, 1)
    for layer in t.layers:
      np.testing.assert_array_equal(masks[layer.name], layer_mask(t, groups, layer.name))
    assert pruning.exact_flops(t, info['keep']) == reference_macs(t, keep) < target


def test_resnet56_chain_of_28_members_shares_one_mask_of_64():
  t = topo('resnet56')
  chains = t.chains
  assert list(chains) == ['stem']
  members = chains['stem']
  assert len(members) == 28 and members[0] == 'stem'
  assert members[1:] == tuple(f'layer{s}_{i}_conv2' for s in (1, 2, 3) for i in range(9))
  rng = np.random.default_rng(3)
  fp, a, b = draw_candidate(t, rng, 'search')
  masks, info = pruning.global_prune(t, fp, a, b, 0.45)
  assert bool(info['reached'])
  chain_mask = np.asarray(masks['layer3_8_conv2'])
  assert chain_mask.shape == (64,)
  for name in members:
    width = t.layer(name).out_channels
    np.testing.assert_array_equal(masks[name], chain_mask[:width])
  # The chain's 64 items sit at the stem's place, before every conv1's.
  groups, *_ = reference_prune(t, fp, a, b, 0.45, 0.1, 1)
  assert list(groups)[:2] == ['stem', 'layer1_0_conv1'] and len(groups['stem']) == 64


def test_safeguard_quota():
  t = topo('resnet56')
  quota = dict(zip(t.names, pruning.safeguard_quota(t, 0.1)))
  assert quota['stem'] == 14 and quota['layer2_0_conv1'] == 28 and quota['layer3_0_conv1'] == 57
  assert dict(zip(t.names, pruning.safeguard_quota(t, 0.0)))['stem'] == 15
  assert dict(zip(t.names, pruning.safeguard_quota(t, 0.3)))['stem'] == 11  # floor(11.2)


def chain_topology():
  """By hand: 'a' 1->2 and 'c' 2->4 share a chain (like option-A shortcuts), 'b' 2->2 is free; all 1x1
  convs on 1x1 maps, so MACs = c_in * c_out; dense 4->1. Dense MACs: 2 + 4 + 8 + 4 = 18."""
  layer = lambda name, index, c_in, c_out, source, consumers, chain: Layer(
      name, index, c_in, c_out, 1, 1, 1, 1, 1, source, consumers, chain, 8)
  return Topology('hand', 1, 1, (layer('a', 0, 1, 2, None, ('b',), 'a'), layer('b', 1, 2, 2, 'a', ('c',), None),
                                 layer('c', 2, 2, 4, 'b', ('fc',), 'a')), 'c', 1, 0)


def test_hand_worked_chain_example():
  t = chain_topology()
  fp = {'a': [5, 1], 'b': [2, 0], 'c': [1, 1, 4, 3]}
  a, b = np.ones(3), np.zeros(3)
  # Items before sorting: chain channels 0..3 valued 5+1, 1+1, 4, 3 (only 'c' has channels 2, 3), then
  # b's channels 0, 1 valued 2, 0. Stable ascending order: b1 (0), chain1 (2; before b0, its tie, which
  # stands later), b0 (2), chain3 (3), chain2 (4), chain0 (6). Quotas at safeguard 0: a 1, b 1, c 3. The walk:
  #   b1 goes (b: 2 -> 1)                                  cost 2 + 2*1 + 1*4 + 4 = 12
  #   chain1 goes from a and c (a: 2 -> 1, c: 4 -> 3)        cost 1 + 1*1 + 1*3 + 3 = 8
  #   b0 is skipped (b's quota is spent)
  #   chain3 goes from c only (c: 3 -> 2)                    cost 1 + 1 + 2 + 2 = 6
  #   chain2 goes from c only (c: 2 -> 1)                    cost 4
  #   chain0 is skipped (a's quota is spent)
  masks, info = pruning.global_prune(t, fp, a, b, keep_fraction=0.5, safeguard=0.0)  # target 9: stop at 8
  assert {k: list(np.asarray(v)) for k, v in masks.items()} == {'a': [1, 0], 'b': [1, 0], 'c': [1, 0, 1, 1]}
  assert float(info['flops']) == 8 and int(info['num_removed']) == 2 and int(info['last_removed']) == 1
  # Checking only at positions 0, 10, ...: cost 12 at position 0, then the walk runs out at cost 4.
  masks, info = pruning.global_prune(t, fp, a, b, keep_fraction=0.5, safeguard=0.0, check_every=10)
  assert {k: list(np.asarray(v)) for k, v in masks.items()} == {'a': [1, 0], 'b': [1, 0], 'c': [1, 0, 0, 0]}
  assert float(info['flops']) == 4 and bool(info['reached']) and int(info['last_removed']) == 4
  # 0.2 * 18 = 3.6 < 4, the least this ranking can reach.
  with pytest.raises(ValueError, match=r'keep_fraction=0.2 is below what safeguard=0.0 allows for hand: the '
                                       r'most it can prune leaves 22.22% of FLOPs; raise keep_fraction to at '
                                       r'least 0.223 or lower the safeguard'):
    pruning.global_prune(t, fp, a, b, keep_fraction=0.2, safeguard=0.0)


def test_unreachable_target_raises_one_clear_sentence():
  t = topo('resnet56')
  fp, a, b = draw_candidate(t, np.random.default_rng(0), 'identity')
  with pytest.raises(ValueError, match=r'^keep_fraction=0.02 is below what safeguard=0.1 allows for resnet56: '
                                       r'the most it can prune leaves \d+\.\d\d% of FLOPs; raise keep_fraction '
                                       r'to at least 0\.\d+ or lower the safeguard\.$') as raised:
    pruning.global_prune(t, fp, a, b, 0.02)
  suggested = float(str(raised.value).split('at least ')[1].split(' ')[0])
  masks, info = pruning.global_prune(t, fp, a, b, suggested)  # the suggestion works
  assert bool(info['reached'])
  batch = np.stack([a, a]), np.stack([b, b - 100 * (np.arange(t.num_layers) == 5)])
  with pytest.raises(ValueError, match=r'for resnet56 \(candidate [01] of 2\)'):
    pruning.global_prune(t, fp, *batch, 0.02)


@pytest.mark.parametrize('kwargs,message', [
    (dict(keep_fraction=0.0), r'keep_fraction=0.0 must be in \(0, 1\]'),
    (dict(keep_fraction=1.5), r'keep_fraction=1.5 must be in \(0, 1\]'),
    (dict(safeguard=1.0), r'safeguard=1.0 must be in \[0, 1\)'),
    (dict(check_every=0), r'check_every=0 must be a positive integer'),
    (dict(fp_drop='layer2_2_conv1'), r"no filter properties for layer 'layer2_2_conv1'"),
    (dict(fp_extra='layer9_0_conv1'), r"fp names layer\(s\) \['layer9_0_conv1'\] that resnet20 does not have"),
    (dict(fp_short='layer1_1_conv2'), r"fp for layer 'layer1_1_conv2' has shape \(15,\), but the layer has 16"),
    (dict(fp_list_short=True), r'fp has 18 vectors, but resnet20 has 19 prunable layers'),
    (dict(a_short=True), r'a has shape \(18,\), but resnet20 has 19 prunable layers'),
    (dict(b_nan=True), r'b holds NaN'),
])
def test_bad_input_raises_value_error_naming_it(kwargs, message):
  t = topo('resnet20')
  fp = {l.name: np.arange(l.out_channels, dtype=F32) for l in t.layers}
  a, b = np.ones(t.num_layers), np.zeros(t.num_layers)
  settings = dict(keep_fraction=0.5, safeguard=0.1, check_every=1)
  settings.update({k: v for k, v in kwargs.items() if k in settings})
  if 'fp_drop' in kwargs:
    del fp[kwargs['fp_drop']]
  if 'fp_extra' in kwargs:
    fp[kwargs['fp_extra']] = np.ones(3)
  if 'fp_short' in kwargs:
    fp[kwargs['fp_short']] = fp[kwargs['fp_short']][:-1]
  if 'fp_list_short' in kwargs:
    fp = list(fp.values())[:-1]
  if 'a_short' in kwargs:
    a = a[:-1]
  if 'b_nan' in kwargs:
    b = b.copy()
    b[3] = np.nan
  with pytest.raises(ValueError, match=message):
    pruning.global_prune(t, fp, a, b, **settings)
