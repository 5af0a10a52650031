"""VIB channel gates, DJPQ's structured pruning (BASELINES.md, "DJPQ"; [code: zhuchen03/VIBNet, ib_layers.py]).

Per gate and output channel j two parameters: mu_j (init N(1, 0.01)) and log sigma_j^2 (init N(-9, 0.01)).

    training:  z = mu + eps * sigma, eps ~ N(0, 1) drawn per example and channel (broadcast over H, W)
    test:      z_j = mu_j if log alpha_j < threshold else 0,   log alpha_j = log sigma_j^2 - log(mu_j^2 + 1e-8)
    penalty:   KL_l = 0.5 * kl_mult_l * H_l * W_l * sum_j log(1 + mu_j^2 / (sigma_j^2 + 1e-8)),  kl_mult_l = 1/H_l

The threshold is 0 in VIBNet (a config setting here). A pruned channel is exactly 0 at test time, a kept one
is scaled by mu_j, which folds into the BatchNorm it multiplies (methods/djpq.py does at readout).

Chains [ours] (METHOD.md, "Chains"): layers that must share a mask share ONE gate, as wide as the widest
member; a member of width n uses the gate's first n channels (option-A ResNets: channel j < 16 is shared by
all stages), so one gate gives every member one mask, and one noise draw per example serves them all. The KL
is a per-layer penalty: each gated layer adds its own term over its own channels and map size.

Where the gate multiplies [ours]: at the mask's place, the BatchNorm output (models.layers.MaskedQConv), the
activation after it. VIBNet multiplies after the activation; for z >= 0 the two are the same
(relu(z x) = z relu(x)), and only at the mask's place does a chain's residual stream carry one gate factor (not
one per block), and the kept mu fold exactly into BatchNorm whatever their sign.

At least one channel per layer [ours]: where a gate would prune every channel of a member (a layer with none
left computes nothing), the channel of that member's prefix with the smallest log alpha stays; the test-time
gate, the readout and the BOPs term all use this one rule (`keep_mask`).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MU_INIT = (1.0, 0.01)  # [code] mean, standard deviation of mu's init
LOG_SIGMA2_INIT = (-9.0, 0.01)  # [code] of log sigma^2's init
EPSILON = 1e-8  # [code] in log alpha and in the KL
RNG = 'gate'  # the Flax rng stream of the training noise: apply(..., train=True, rngs={'gate': key})


class Group(NamedTuple):
  """One gate: its module name, width (its widest member's channels), and members ((layer name, channels), ...)
  in forward order."""
  name: str
  width: int
  members: tuple[tuple[str, int], ...]

  @property
  def member_widths(self) -> tuple[int, ...]:
    """The distinct member widths, ascending (the prefixes `keep_mask` must each leave a channel in)."""
    return tuple(sorted({n for _, n in self.members}))


def groups(convs: Sequence[Any]) -> tuple[Group, ...]:
  """One gate per chain and per free layer, in forward order of their first member.

  convs: the prunable convs in forward order, anything with .name, .out_channels and .chain (a spec's
  ConvSpecs or a topology's Layers: both give the same groups)."""
  by_chain: dict[str, list] = {}
  order = []
  for c in convs:
    key = c.chain if c.chain is not None else c.name
    if key not in by_chain:
      by_chain[key] = []
      order.append(key)
    by_chain[key].append((c.name, int(c.out_channels)))
  return tuple(Group('gate_' + key, max(n for _, n in by_chain[key]), tuple(by_chain[key])) for key in order)


def log_alpha(mu: jax.Array, log_sigma2: jax.Array) -> jax.Array:
  """(C,) log sigma^2 - log(mu^2 + 1e-8): the gate's log noise-to-signal ratio; pruned where >= threshold."""
  return log_sigma2 - jnp.log(mu ** 2 + EPSILON)


def keep_mask(mu: jax.Array, log_sigma2: jax.Array, threshold: float = 0.0,
              member_widths: Sequence[int] = ()) -> jax.Array:
  """(C,) bool: log alpha < threshold, and in each member prefix [:n] (n in member_widths) at least the channel
  of smallest log alpha (the prefixes nest, so forcing one channel in a short prefix serves the longer ones)."""
  la = log_alpha(mu, log_sigma2)
  keep = la < threshold
  index = jnp.arange(la.shape[-1])
  for n in sorted(member_widths):
    best = jnp.argmin(la[:n])
    keep = keep | ((index == best) & ~jnp.any(keep[:n]))
  return keep


def sample(mu: jax.Array, log_sigma2: jax.Array, eps: jax.Array) -> jax.Array:
  """(B, C) training gate mu + eps * sigma; eps (B, C) standard normal, one per example and channel."""
  return mu + eps * jnp.exp(0.5 * log_sigma2)


def deterministic(mu: jax.Array, log_sigma2: jax.Array, threshold: float = 0.0,
                  member_widths: Sequence[int] = ()) -> jax.Array:
  """(C,) test-time gate: mu on kept channels (`keep_mask`), exactly 0 on pruned ones."""
  return jnp.where(keep_mask(mu, log_sigma2, threshold, member_widths), mu, 0.0)


def kl_divergence(mu: jax.Array, log_sigma2: jax.Array, height: int, width: int,
                  kl_mult: float | None = None) -> jax.Array:
  """Scalar 0.5 * kl_mult * H * W * sum_j log(1 + mu_j^2 / (sigma_j^2 + 1e-8)) over the channels given
  (a member passes its own prefix); kl_mult defaults to 1/H (VIBNet's CIFAR configs). H, W: the gated map."""
  kl_mult = 1.0 / height if kl_mult is None else kl_mult
  per_channel = jnp.log1p(mu ** 2 / (jnp.exp(log_sigma2) + EPSILON))
  return 0.5 * kl_mult * height * width * jnp.sum(per_channel)


def kept_surrogate(mu: jax.Array, log_sigma2: jax.Array, threshold: float, temperature: float,
                   member_widths: Sequence[int] = ()) -> jax.Array:
  """(C,) float: the hard keep_mask (0/1) in the forward pass, exactly; the gradient of the sigmoid surrogate
  sigmoid((threshold - log alpha) / temperature) in the backward [ours: BASELINES.md names the sigmoid]."""
  hard = keep_mask(mu, log_sigma2, threshold, member_widths).astype(jnp.float32)
  soft = jax.nn.sigmoid((threshold - log_alpha(mu, log_sigma2)) / temperature)
  return hard + (soft - jax.lax.stop_gradient(soft))  # soft - soft is exactly 0: the forward stays hard


def _normal(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


class VIBGate(nn.Module):
  """One gate's parameters 'mu' and 'log_sigma2' (width,); returns (batch, width) training gates (noise from
  the 'gate' rng stream) or the (width,) test-time gate."""
  width: int
  threshold: float = 0.0
  member_widths: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, batch: int, train: bool) -> jax.Array:
    mu = self.param('mu', _normal(*MU_INIT), (self.width,))
    log_sigma2 = self.param('log_sigma2', _normal(*LOG_SIGMA2_INIT), (self.width,))
    if train:
      eps = jax.random.normal(self.make_rng(RNG), (batch, self.width), mu.dtype)
      return sample(mu, log_sigma2, eps)
    return deterministic(mu, log_sigma2, self.threshold, self.member_widths)


def gate_masks(gate_groups: Sequence[Group], batch: int, train: bool, threshold: float) -> dict[str, jax.Array]:
  """Called inside a compact module: one VIBGate per group (named group.name), and per member layer its mask
  argument: (batch, 1, 1, n) in training, (n,) at test, the gate's first n channels."""
  out = {}
  for g in gate_groups:
    z = VIBGate(g.width, threshold, g.member_widths, name=g.name)(batch, train)
    for layer, n in g.members:
      out[layer] = z[:, None, None, :n] if train else z[:n]
  return out
