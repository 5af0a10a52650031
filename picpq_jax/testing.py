"""Random model variables and pruning masks for tests and benchmarks, made without compiling anything.

On XLA CPU, compiling `model.init`'s random initializers takes tens of seconds; these take the shapes from
`jax.eval_shape` and fill them from numpy instead.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.models.net import Net
from picpq_jax.models.spec import ArchSpec
from picpq_jax.topology import Topology


def random_variables(spec: ArchSpec, seed: int = 0, spread: float = 0.3) -> dict:
  """{'params', 'batch_stats'} of Net(spec), float32 numpy arrays.

  He-normal kernels (over fan-out); BatchNorm with random running statistics (var in [0.5, 2]) and affine
  terms (gamma = 1 + spread * N(0, 1), beta = spread * N(0, 1); spread 0.5 gives some negative gammas); dense
  biases spread * N(0, 1). Random statistics and affine terms keep masking or folding errors from hiding.
  """
  shapes = jax.eval_shape(lambda: Net(spec).init(
      jax.random.key(0), jnp.zeros((1, spec.image_size, spec.image_size, spec.in_channels)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_out = leaf.shape[-1] * (leaf.shape[0] * leaf.shape[1] if leaf.ndim == 4 else 1)
      return rng.normal(0, math.sqrt(2 / fan_out), leaf.shape).astype(np.float32)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name.endswith("['scale']"):
      return (1 + spread * rng.normal(size=leaf.shape)).astype(np.float32)
    return (spread * rng.normal(size=leaf.shape)).astype(np.float32)  # BN bias and mean, dense bias

  return jax.tree_util.tree_map_with_path(fill, shapes)


def random_masks(topo: Topology, rng: np.random.Generator, keep_prob: float = 0.6) -> dict[str, np.ndarray]:
  """Random 0/1 float32 masks that respect chains: one mask per chain (a member of width n gets its first n
  entries), every other layer its own; each channel kept with keep_prob, at least one per layer."""
  by_chain, masks = {}, {}
  for layer in topo.layers:
    if layer.chain is not None:
      if layer.chain not in by_chain:
        width = max(topo.layer(m).out_channels for m in topo.chains[layer.chain])
        m = (rng.random(width) < keep_prob).astype(np.float32)
        m[0] = 1.0  # the first entry, so that every member (a prefix) keeps a channel
        by_chain[layer.chain] = m
      masks[layer.name] = by_chain[layer.chain][:layer.out_channels]
    else:
      m = (rng.random(layer.out_channels) < keep_prob).astype(np.float32)
      m[rng.integers(layer.out_channels)] = 1.0
      masks[layer.name] = m
  return masks
