"""The uniform baseline every paper compares with: the same fraction of channels kept in every prunable
layer and one bit-width everywhere.

Settings: `config.uniform` (keep_fraction of each layer's output channels; bits for weights and
activations). In each layer (or chain: layers that must keep one mask, METHOD.md "Chains") the channels with
the largest filter L1 norms stay (a chain's channel scores the sum over the members that have it);
round(keep_fraction * width) of them, at least one. Every prunable layer is pruned alike, the stem too (as
PIC-PQ may); layers whose B_max is 32 (the stem, MobileNetV2's last conv: PIC-PQ's convention, followed by
every method of the ledger) stay at 32 bits. No data and no training: the policy is a function of the
baseline weights alone.
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from picpq_jax import cost, criteria
from picpq_jax import policy as policy_lib
from picpq_jax.methods import Context, Result

NAME = 'uniform'
SECTION = 'uniform'
PROVENANCE = (
    '[ours, the field\'s usual baseline] one keep fraction and one bit-width for every layer',
    '[ours] channels ranked by filter L1 norm within each layer or chain; layers with B_max 32 stay 32-bit',
)

FULL_PRECISION = 32


def check_config(config: ml_collections.ConfigDict, topology) -> None:
  u = config.uniform
  if isinstance(u.keep_fraction, bool) or not 0 < u.keep_fraction <= 1:
    raise ValueError(f'uniform.keep_fraction={u.keep_fraction!r} must lie in (0, 1]: the fraction of each '
                     f'layer\'s output channels that {topology.arch} keeps, e.g. 0.5.')
  if isinstance(u.bits, bool) or not isinstance(u.bits, (int, np.integer)) or not 1 <= u.bits <= 32:
    raise ValueError(f'uniform.bits={u.bits!r} must be an integer in 1..32 (weights and activations of every '
                     'quantized layer).')


def uniform_masks(topology, l1: dict[str, np.ndarray], keep_fraction: float) -> dict[str, np.ndarray]:
  """layer name -> (out_channels,) float32 0/1: the round(keep_fraction * width) (>= 1) channels of largest L1
  per layer, one mask per chain (scored by the members' summed L1)."""
  groups = {}  # group id -> member names, a free layer being its own group
  for layer in topology.layers:
    groups.setdefault(layer.chain or layer.name, []).append(layer.name)
  masks = {}
  for members in groups.values():
    layers = [topology.layer(n) for n in members]
    width = max(l.out_channels for l in layers)
    score = np.zeros(width, np.float64)
    for l in layers:
      score[:l.out_channels] += np.asarray(l1[l.name], np.float64)
    k = max(1, int(round(keep_fraction * width)))
    keep = np.zeros(width, np.float32)
    keep[np.argsort(-score, kind='stable')[:k]] = 1.0  # ties: the earlier channel stays
    for l in layers:  # a narrower member of a chain (a prefix of its channels) keeps at least its best one
      if not keep[:l.out_channels].any():
        keep[int(np.argmax(score[:l.out_channels]))] = 1.0
    for l in layers:
      masks[l.name] = keep[:l.out_channels]
  return masks


def uniform_bits(topology, bits: int) -> dict[str, int]:
  """`bits` for every layer, 32 where B_max is 32."""
  return {l.name: FULL_PRECISION if l.b_max >= FULL_PRECISION else int(bits) for l in topology.layers}


def run(context: Context) -> Result:
  c, topo = context.config, context.topology
  path = os.path.join(context.workdir, policy_lib.POLICY_FILE)
  if os.path.exists(path):
    policy = policy_lib.read_policy(path, c.model.arch)
  else:
    l1 = criteria.filter_properties(context.model, context.baseline, None, 'l1')
    masks = uniform_masks(topo, l1, c.uniform.keep_fraction)
    policy = policy_lib.from_masks_and_bits(
        c.model.arch, c.data.name, NAME, masks, uniform_bits(topo, c.uniform.bits),
        settings={'keep_fraction': c.uniform.keep_fraction, 'bits': c.uniform.bits})
    policy = policy_lib.replace_summary(policy, cost.ledger(topo, policy))
    policy_lib.write_policy(context.workdir, policy)
  return Result(policy=policy, model=context.model)

