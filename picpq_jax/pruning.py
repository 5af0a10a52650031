"""Global pruning to a FLOPs target (METHOD.md, "Global pruning, precisely").

Every filter of every layer becomes an item valued by its PIC importance a_l * fp_l[j] + b_l; the filters of
a chain (layers that keep one channel mask) are one item per chain channel, valued by the sum over the
members that have that channel. Items are sorted ascending (stably: ties keep forward order) and removed
in that order, each within its layers' safeguard quota, until the model's MACs fall below
keep_fraction * dense MACs.

`prune_masks` is the jittable core: padded arrays in, masks and flags out, a `lax.scan` over the sorted
items with O(L) work per item, and no Python loop over filters. Under `jax.vmap` over (a, b) it
ranks a whole population of candidates at once (`prune_masks_batched`). `global_prune` is the user-facing
wrapper: it validates the input and raises a ValueError when the target is out of reach.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax import cost
from picpq_jax.criteria import pic_importance
from picpq_jax.topology import Topology, kernel_keep, kernel_mask

FilterProperties = Union[Mapping[str, Any], Sequence[Any]]  # by layer name, or a list in forward order
Masks = dict[str, jax.Array]  # layer name -> 0/1 per output channel
Info = dict[str, jax.Array]


def safeguard_quota(topology: Topology, safeguard: float) -> np.ndarray:
  """(L,) int32 most channels each layer may lose: min(floor(n * (1 - s)), n - 2), or n - 1 when s == 0."""
  n = topology.out_channels.astype(np.int64)
  if safeguard == 0:
    quota = n - 1
  else:
    quota = np.minimum(np.floor(n * (1.0 - safeguard)).astype(np.int64), n - 2)
  return np.maximum(quota, 0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _Items:
  """The ranking's items as constant tables.

  A group is a free layer or a whole chain; groups stand in forward order of their first layer, and the
  items of a group are its channels 0, 1, ... (the width of a chain is its widest member's).
  """
  layer_items: np.ndarray  # (L, C) item of each (layer, channel); N (past the end) beyond the layer's width
  members: np.ndarray  # (N, L) bool: the layers that lose a channel when item k is removed
  sources: np.ndarray  # (N, M) flat index l * C + j of each member's (layer, channel) in forward order,
                       # L * C (a zero) where a member lacks channel j; M = most members of a group

  @property
  def num_items(self) -> int:
    return self.members.shape[0]


@functools.lru_cache(maxsize=None)
def _items(topology: Topology) -> _Items:
  chains = topology.chains
  groups, start, seen = [], np.zeros(topology.num_layers, np.int32), {}
  num_items = 0
  for layer in topology.layers:
    if layer.chain in seen:
      start[layer.index] = seen[layer.chain]
      continue
    group = [layer.index] if layer.chain is None else [topology.index(n) for n in chains[layer.chain]]
    groups.append(group)
    start[layer.index] = num_items
    if layer.chain is not None:
      seen[layer.chain] = num_items
    num_items += max(topology.layers[m].out_channels for m in group)
  widths = topology.out_channels
  num_layers, channels = topology.num_layers, int(widths.max())
  members = np.zeros((num_items, num_layers), bool)
  sources = np.full((num_items, max(len(g) for g in groups)), num_layers * channels, np.int32)
  for group in groups:
    first = start[group[0]]
    for column, m in enumerate(group):
      members[first:first + widths[m], m] = True  # member m has channels 0 .. widths[m] - 1
      sources[first:first + widths[m], column] = m * channels + np.arange(widths[m])
  layer_items = np.where(np.arange(channels) < widths[:, None], start[:, None] + np.arange(channels), num_items)
  return _Items(layer_items.astype(np.int32), members, sources)


def item_values(topology: Topology, fp_padded: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """(N,) float32 importance of every item, in the pre-sort order (groups in forward order, channel-major).

  fp_padded: (L, C) filter properties, row l valid in its first out_channels[l] entries; a, b: (L,).
  A chain item sums its members' importances in forward order (a fixed order keeps float32 sums, and so
  the ties of the sort, reproducible); members without that channel add nothing.
  """
  imp = pic_importance(jnp.asarray(fp_padded, jnp.float32), jnp.asarray(a, jnp.float32)[:, None],
                       jnp.asarray(b, jnp.float32)[:, None])
  imp = jnp.append(imp.reshape(-1), 0.0)  # the zero stands for "this member lacks the channel"
  terms = imp[_items(topology).sources]  # (N, M)
  value = terms[:, 0]
  for column in range(1, terms.shape[1]):
    value = value + terms[:, column]
  return value


_flops_jit = jax.jit(cost.flops, static_argnums=0)  # one compile instead of one per eager op


def exact_flops(topology: Topology, keep: Any) -> int:
  """MACs of host kept counts `keep` (L,) as an exact Python int, whatever the model's size."""
  # cost.flops in float32 is within a few MACs per million of the truth and in int32 exact modulo 2^32:
  # together they pin the exact count. Evaluated eagerly even while a caller is being traced.
  with jax.ensure_compile_time_eval():
    approx = float(_flops_jit(topology, np.asarray(keep, np.float32)))
    residue = int(_flops_jit(topology, np.asarray(keep, np.int32))) % 2 ** 32
  return residue + 2 ** 32 * round((approx - residue) / 2 ** 32)


def flops_threshold(topology: Topology, keep_fraction: float) -> int:
  """The integer T with: MACs < keep_fraction * dense MACs exactly when MACs < T.

  The target is taken in float64 on the host (METHOD.md's arithmetic); a MAC count c is an integer, so
  c < t exactly when c < ceil(t).
  """
  return math.ceil(float(keep_fraction) * _dense_flops(topology))


@functools.lru_cache(maxsize=None)
def _dense_flops(topology: Topology) -> int:
  return exact_flops(topology, cost.dense_keep(topology))


def _walk_settings(topology: Topology, keep_fraction: float, safeguard: float,
                   check_every: int) -> dict[str, np.ndarray]:
  """The walk's settings as host arrays, so that one compiled walk serves every setting.

  'threshold': int32 T of `flops_threshold`, wrapped modulo 2^32 past 2^31; 'threshold_float': float32 T;
  'quota': (L,) int32 `safeguard_quota`; 'check_every': int32; 'keep_all': bool, keep_fraction 1, whose target
  the dense model meets as it is (nothing is removed).
  """
  _check_settings(keep_fraction, safeguard, check_every)
  threshold = flops_threshold(topology, keep_fraction)
  return dict(threshold=np.int32((threshold + 2 ** 31) % 2 ** 32 - 2 ** 31),
              threshold_float=np.float32(threshold), quota=safeguard_quota(topology, safeguard),
              check_every=np.int32(check_every), keep_all=np.bool_(keep_fraction >= 1))


def _cost_below(topology: Topology, keep: jax.Array, settings: Mapping[str, jax.Array]) -> jax.Array:
  """Whether the MACs of int32 kept counts `keep` (L,) are below the threshold T, exactly.

  int32 MACs are exact below 2^31, which covers the CIFAR models. Past that (ImageNet ResNet-50) they are
  still exact modulo 2^32, so their wrapped difference to T is the true difference whenever that is below
  2^31 in magnitude; a float32 total (relative error ~1e-6) decides the sign farther away.
  """
  macs = cost.flops(topology, keep)
  if _dense_flops(topology) < 2 ** 31:
    return macs < settings['threshold']
  approx = cost.flops(topology, keep.astype(jnp.float32)) - settings['threshold_float']
  return jnp.where(jnp.abs(approx) < 2 ** 30, macs - settings['threshold'] < 0, approx < 0)


def _walk(topology: Topology, fp_padded: jax.Array, a: jax.Array, b: jax.Array,
          settings: Mapping[str, jax.Array]) -> tuple[Masks, Info]:
  """`prune_masks` with its settings as traced arrays (`_walk_settings`)."""
  items = _items(topology)
  order = jnp.argsort(item_values(topology, fp_padded, a, b), stable=True)
  members = jnp.asarray(items.members, jnp.int32)

  def visit(carry, x):
    """Visit the item at sorted position i: remove it if the quotas allow and the target is not met yet."""
    keep, quota, done = carry
    i, item = x
    lose = members[item]  # (L,) the layers that have this item's channel
    # A chain item goes only while every member that has the channel still has quota left.
    removable = jnp.all((lose == 0) | (quota > 0)) & ~done
    lose = lose * removable
    keep, quota = keep - lose, quota - lose
    met = (i % settings['check_every'] == 0) & _cost_below(topology, keep, settings)
    return (keep, quota, done | met), removable

  # A scan over all N items (those after the stop remove nothing) beat a while_loop that stops early,
  # measured on CPU for 64 vmapped candidates: ResNet-56 42 vs 49 ms per call and 0.8 vs 2.7 s to compile,
  # MobileNetV2 0.44 vs 0.92 s per call (a batched while_loop runs until its slowest candidate anyway).
  positions = jnp.arange(items.num_items, dtype=jnp.int32)
  start = (jnp.asarray(cost.dense_keep(topology)), jnp.asarray(settings['quota']), jnp.asarray(settings['keep_all']))
  (keep, _, _), removed_sorted = jax.lax.scan(visit, start, (positions, order))

  kept_items = jnp.ones((items.num_items + 1,), jnp.float32).at[order].set(1.0 - removed_sorted)
  masks = unpad_masks(topology, kept_items.at[-1].set(0.0)[items.layer_items])
  info = dict(
      reached=settings['keep_all'] | _cost_below(topology, keep, settings),
      flops=cost.flops(topology, keep.astype(jnp.float32)),
      keep=keep,
      num_removed=jnp.sum(removed_sorted, dtype=jnp.int32),
      last_removed=jnp.max(jnp.where(removed_sorted, positions, -1)))
  return masks, info


@functools.partial(jax.jit, static_argnums=0)
def _walk_one(topology, fp_padded, a, b, settings):
  return _walk(topology, fp_padded, a, b, settings)


@functools.partial(jax.jit, static_argnums=0)
def _walk_many(topology, fp_padded, a, b, settings):
  return jax.vmap(lambda a_, b_: _walk(topology, fp_padded, a_, b_, settings))(a, b)


def prune_masks(topology: Topology, fp_padded: jax.Array, a: jax.Array, b: jax.Array, keep_fraction: float,
                safeguard: float = 0.1, check_every: int = 1) -> tuple[Masks, Info]:
  """The jittable core of `global_prune`: masks meeting the FLOPs target for one candidate (a, b).

  Works eagerly, under jit and under vmap over fp_padded, a and b. One compilation per topology serves
  every keep_fraction, safeguard and check_every: they become arrays on the host.

  Args:
    topology: the model's prunable-layer table.
    fp_padded: (L, C) float filter properties, row l valid in its first out_channels[l] entries
      (`pad_filter_properties`).
    a, b: (L,) PIC scale and shift per layer, forward order.
    keep_fraction: Python float in (0, 1]; the target is keep_fraction * dense MACs.
    safeguard: Python float in [0, 1); see `safeguard_quota`.
    check_every: Python int >= 1: the cost is checked after the items at sorted positions 0, check_every,
      2 * check_every, ...

  Returns:
    masks: layer name -> (out_channels,) float32 0/1 (chain members share a prefix of one mask).
    info: 'reached' bool (final MACs < target), 'flops' float32 final MACs, 'keep' (L,) int32 kept
      channels, 'num_removed' int32 items removed, 'last_removed' int32 sorted position of the last
      removed item (-1 if none). Never raises for an unreachable target: it comes back as
      reached == False, with every removable item removed. (Bad settings raise ValueError on the host.)

  Cost: a stable sort of the N items, then a `lax.scan` over them with O(L) work per item.
  """
  return _walk_one(topology, fp_padded, a, b, _walk_settings(topology, keep_fraction, safeguard, check_every))


def prune_masks_batched(topology: Topology, fp_padded: jax.Array, a: jax.Array, b: jax.Array,
                        keep_fraction: float, safeguard: float = 0.1,
                        check_every: int = 1) -> tuple[Masks, Info]:
  """`prune_masks` for a population sharing fp: a, b (P, L) -> masks name -> (P, out_channels), info
  values with a leading P axis. Jittable like `prune_masks`."""
  return _walk_many(topology, fp_padded, a, b, _walk_settings(topology, keep_fraction, safeguard, check_every))


def unpad_masks(topology: Topology, masks_padded: jax.Array) -> dict[str, jax.Array]:
  """layer name -> (..., out_channels) from (..., L, C) rows padded to the widest layer."""
  return {l.name: masks_padded[..., l.index, :l.out_channels] for l in topology.layers}


def pad_filter_properties(topology: Topology, fp: FilterProperties) -> np.ndarray:
  """(L, C) float32 filter properties, zero-padded to the widest layer, from a dict by layer name or a
  list in forward order (layer l's vector has out_channels[l] entries). Raises ValueError naming the
  layer for a missing, unknown or wrong-length vector."""
  names = topology.names
  if isinstance(fp, Mapping):
    unknown = sorted(set(fp) - set(names))
    missing = [n for n in names if n not in fp]
    if unknown:
      raise ValueError(f'fp names layer(s) {unknown} that {topology.arch} does not have; its prunable layers '
                       f'are {list(names[:4])}... (topology.names).')
    if missing:
      raise ValueError(f'fp has no filter properties for layer {missing[0]!r} of {topology.arch} '
                       f'({len(missing)} layer(s) missing); give one vector per prunable layer.')
    vectors = [fp[n] for n in names]
  else:
    vectors = list(fp)
    if len(vectors) != len(names):
      raise ValueError(f'fp has {len(vectors)} vectors, but {topology.arch} has {len(names)} prunable layers; '
                       'give one per layer in forward order (topology.names).')
  padded = np.zeros((len(names), int(topology.out_channels.max())), np.float32)
  for layer, vector in zip(topology.layers, vectors):
    vector = np.asarray(vector, np.float32)
    if vector.shape != (layer.out_channels,):
      raise ValueError(f'fp for layer {layer.name!r} has shape {vector.shape}, but the layer has '
                       f'{layer.out_channels} output channels; give one value per filter.')
    if not np.all(np.isfinite(vector)):
      raise ValueError(f'fp for layer {layer.name!r} holds NaN or infinite values.')
    padded[layer.index, :layer.out_channels] = vector
  return padded


def _check_pic_parameters(topology: Topology, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
  num_layers = topology.num_layers
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  for name, value in (('a', a), ('b', b)):
    if value.ndim not in (1, 2) or value.shape[-1] != num_layers:
      raise ValueError(f'{name} has shape {value.shape}, but {topology.arch} has {num_layers} prunable layers; '
                       f'give ({num_layers},) values in forward order, or (P, {num_layers}) for P candidates.')
    if not np.all(np.isfinite(value)):
      raise ValueError(f'{name} holds NaN or infinite values.')
  if a.shape != b.shape:
    raise ValueError(f'a has shape {a.shape} and b has shape {b.shape}; give both for the same candidates.')
  return a, b


def _check_settings(keep_fraction: float, safeguard: float, check_every: int) -> None:
  if not 0 < keep_fraction <= 1:
    raise ValueError(f'keep_fraction={keep_fraction} must be in (0, 1]: the fraction of the dense FLOPs the '
                     'pruned model keeps.')
  if not 0 <= safeguard < 1:
    raise ValueError(f'safeguard={safeguard} must be in [0, 1): the fraction of each layer pruning must keep.')
  if int(check_every) != check_every or check_every < 1:
    raise ValueError(f'check_every={check_every} must be a positive integer (1 stops at the first item that '
                     'meets the target; 10 is the original code\'s choice).')


def global_prune(topology: Topology, fp: FilterProperties, a: Any, b: Any, keep_fraction: float,
                 safeguard: float = 0.1, check_every: int = 1) -> tuple[Masks, Info]:
  """Masks that bring the model below keep_fraction of its dense MACs by PIC global ranking.

  Args:
    topology: the model's prunable-layer table (topology.get_topology).
    fp: filter properties: dict layer name -> (out_channels,) vector, or a list of them in forward order.
    a, b: (L,) PIC scale and shift per layer in forward order, or (P, L) for P candidates at once.
    keep_fraction: in (0, 1]; the target is keep_fraction * dense MACs.
    safeguard: in [0, 1); a layer of n channels loses at most min(floor(n (1 - s)), n - 2) (n - 1 at 0).
    check_every: check the cost after sorted positions 0, check_every, ... (10 reproduces the original).

  Returns:
    (masks, info) as `prune_masks` (with a leading P axis on every value for batched a, b).

  Raises:
    ValueError: for bad input, or when the target is out of reach under the safeguard.
  """
  settings = _walk_settings(topology, keep_fraction, safeguard, check_every)
  fp_padded = pad_filter_properties(topology, fp)
  a, b = _check_pic_parameters(topology, a, b)
  masks, info = (_walk_one if a.ndim == 1 else _walk_many)(topology, fp_padded, a, b, settings)
  reached = np.atleast_1d(np.asarray(info['reached']))
  if not reached.all():
    worst = int(np.argmax(np.atleast_1d(np.asarray(info['flops']))))  # an unreached candidate
    keep = np.asarray(info['keep']).reshape(-1, topology.num_layers)[worst]
    fraction = exact_flops(topology, keep) / _dense_flops(topology)
    which = f' (candidate {worst} of {a.shape[0]})' if a.ndim == 2 else ''
    raise ValueError(
        f'keep_fraction={keep_fraction} is below what safeguard={safeguard} allows for {topology.arch}{which}: '
        f'the most it can prune leaves {100 * fraction:.2f}% of FLOPs; raise keep_fraction to at least '
        f'{math.floor(fraction * 1000 + 1) / 1000} or lower the safeguard.')
  return masks, info


def zero_pruned_weights(topology: Topology, params: Mapping[str, Any], masks: Mapping[str, Any]) -> dict:
  """params with every weight of a pruned channel set to 0: the kernel entries `topology.kernel_mask` removes
  (those of removed output filters and of removed input channels, the source layer's mask), and the removed
  filters' BatchNorm scale and bias.

  Masking already zeroes these channels' outputs; zeroing the weights too means a fine-tune keeps them
  exactly 0 (their gradients are 0, and so is the weight decay of a 0 weight), the weight quantizer's
  max|tanh(W)| sees only live weights, and the export's slicing loses nothing.
  """
  params = dict(params)
  keep = {name: jnp.asarray(m, jnp.float32) for name, m in masks.items()}
  for layer in topology.layers:
    if layer.name not in keep and (layer.source is None or layer.source not in keep):
      continue
    _, out_keep = kernel_keep(topology, keep, layer.name)
    unit = dict(params[layer.name])
    unit['kernel'] = unit['kernel'] * kernel_mask(topology, keep, layer.name)
    unit['bn'] = {k: v * out_keep for k, v in unit['bn'].items()}
    params[layer.name] = unit
  return params
