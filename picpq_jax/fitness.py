"""Fitness of search candidates: prune by (a, b), fine-tune tau SGD steps, validation cross-entropy.

For a batch of K candidates one jitted function computes, per candidate (METHOD.md, "Search"):
  (a, b) -> masks (pruning.prune_masks to the FLOPs target)
         -> tau SGD steps from the baseline weights with those masks (BatchNorm in training mode, the SAME
            training batches for every candidate)
         -> mean validation cross-entropy (eval mode).
A candidate whose target is unreachable, or whose loss is not finite, gets NaN (evosax: failed).

Layout of the work: the K candidates are sharded over all devices along the candidate axis (shard_map);
each device walks its candidates in chunks of `chunk_size` (lax.map, so memory stays bounded by one chunk);
within a chunk the candidates run either vmapped ('vmap': one batched computation, the point on GPU/TPU) or
one after another inside the same compiled function ('map'). On XLA CPU each candidate's own weights turn a
vmapped conv into a grouped conv, which is slow (measured 2.3x the sequential cost for 4 ResNet-20
candidates), so 'auto' picks 'map' on CPU and 'vmap' elsewhere.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from picpq_jax import bits as bits_lib
from picpq_jax import pruning, training
from picpq_jax.topology import Topology

EVAL_MODES = ('auto', 'vmap', 'map')


def resolve_eval_mode(mode: str, backend: Optional[str] = None) -> str:
  if mode not in EVAL_MODES:
    raise ValueError(f'search.eval_mode={mode!r} is not a mode; choose one of {list(EVAL_MODES)}.')
  if mode != 'auto':
    return mode
  return 'map' if (backend or jax.default_backend()) == 'cpu' else 'vmap'


def search_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The fine-tune inside the fitness: SGD lr 0.01, momentum 0.9, weight decay 5e-4 by default."""
  return training.make_optimizer(cfg, optax.constant_schedule(cfg.learning_rate))


def make_candidate_fn(model, topology: Topology, fp_padded: np.ndarray, cfg: ml_collections.ConfigDict,
                      b_max: Optional[np.ndarray] = None) -> Callable:
  """(a (L,), b (L,), variables, train_batches, val_batches) -> {'loss', 'flops', 'reached'} (scalars).

  train_batches: {'image': (tau, B, H, W, C), 'label': (tau, B)}; val_batches the same with V batches.
  With cfg.quantize the fine-tune and the validation run with the bits that bits.py assigns to the
  candidate's masks (quantization inside the search; the original does not do this).
  """
  tx = search_optimizer(cfg)
  train_step = training.make_train_step(model, tx)
  eval_step = training.make_eval_step(model)

  def candidate(a, b, variables, train_batches, val_batches):
    masks, info = pruning.prune_masks(topology, fp_padded, a, b, cfg.keep_fraction, cfg.safeguard,
                                      cfg.check_every)
    bits = None
    if cfg.quantize:
      bits = bits_lib.bits_tree(bits_lib.assign_bits_jax(topology, variables['params'], masks, b_max,
                                                         cfg.bit_penalty, cfg.min_bits))
    params = variables['params']
    state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                batch_stats=variables['batch_stats'], opt_state=tx.init(params))

    def fine_tune(state, batch):
      state, _ = train_step(state, batch, masks, bits)
      return state, None

    state, _ = jax.lax.scan(fine_tune, state, train_batches)

    def validate(total, batch):
      out = eval_step(state.variables, batch, masks, bits)
      return jax.tree.map(jnp.add, total, out), None

    zeros = {'loss': jnp.zeros(()), 'correct': jnp.zeros(()), 'count': jnp.zeros(())}
    total, _ = jax.lax.scan(validate, zeros, val_batches)
    loss = total['loss'] / total['count']
    ok = info['reached'] & jnp.isfinite(loss)
    return {'loss': jnp.where(ok, loss, jnp.nan), 'flops': info['flops'].astype(jnp.float32),
            'reached': info['reached']}

  return candidate


def make_population_fitness(candidate_fn: Callable, mesh: Mesh, chunk_size: int, mode: str) -> Callable:
  """Jitted (a (K, L), b (K, L), variables, train_batches, val_batches) -> {'loss','flops','reached'} (K,).

  K must be a multiple of mesh.size * chunk_size (`pad_population` makes it so). Candidates are sharded
  over the mesh's 'data' axis; everything else is replicated.
  """
  mode = resolve_eval_mode(mode)

  def chunk(a, b, *rest):  # (C, L) each
    if mode == 'vmap':
      return jax.vmap(candidate_fn, in_axes=(0, 0, None, None, None))(a, b, *rest)
    return jax.lax.map(lambda ab: candidate_fn(ab[0], ab[1], *rest), (a, b))

  def local(a, b, *rest):  # this device's (K / devices, L) candidates, walked in chunks
    k, num_layers = a.shape
    a = a.reshape(k // chunk_size, chunk_size, num_layers)
    b = b.reshape(k // chunk_size, chunk_size, num_layers)
    out = jax.lax.map(lambda ab: chunk(ab[0], ab[1], *rest), (a, b))
    return jax.tree.map(lambda x: x.reshape(k, *x.shape[2:]), out)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P('data'), P('data'), P(), P(), P()),
                          out_specs=P('data'), check_vma=False)
  return jax.jit(sharded)


def pad_population(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pad the candidate axis to a multiple by repeating the last candidate (its result is discarded)."""
  k = x.shape[0]
  size = -(-k // multiple) * multiple
  return np.concatenate([x, np.repeat(x[-1:], size - k, axis=0)]) if size > k else x


class PopulationFitness:
  """Evaluates encoded or (a, b) candidates of any count K: pads K, calls the compiled function, unpads."""

  def __init__(self, candidate_fn: Callable, variables: Mapping[str, Any], train_batches, val_batches,
               chunk_size: int = 1, mode: str = 'auto', mesh: Optional[Mesh] = None):
    self.mesh = mesh or training.data_mesh()
    self.chunk_size = max(1, int(chunk_size))
    self._fn = make_population_fitness(candidate_fn, self.mesh, self.chunk_size, mode)
    self._args = (training.replicate(variables, self.mesh), training.replicate(train_batches, self.mesh),
                  training.replicate(val_batches, self.mesh))

  def __call__(self, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    k = a.shape[0]
    multiple = self.mesh.size * self.chunk_size
    a_p, b_p = pad_population(np.asarray(a, np.float32), multiple), pad_population(np.asarray(b, np.float32),
                                                                                   multiple)
    out = self._fn(a_p, b_p, *self._args)
    return {key: np.asarray(v)[:k] for key, v in jax.device_get(out).items()}
