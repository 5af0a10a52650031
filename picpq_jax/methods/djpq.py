"""DJPQ (BASELINES.md, "DJPQ"; Wang, Lu, Blankevoort, ECCV 2020): VIB channel gates and learned bit-widths in
one differentiable loss against a BOPs target.

The method: build the baseline's network with a VIB gate per chain and per free conv (gates.py) and DQ's
learned-step quantizer (dq.py) on the kernel and the input of every conv whose B_max is below 32
(`models.create_model(..., quantizer='djpq')`), start from the baseline's weights with the gates and steps at
their init, and train `config.djpq.epochs` epochs on

    loss = cross-entropy + gamma * sum_l KL_l + beta * relu(BOPs / BOPs_dense - 1 / target)^2

where BOPs is `cost.bops` (the one ledger) of the gates' kept channels (hard counts forward, the sigmoid
surrogate's gradient backward: gates.kept_surrogate) at the derived bits (ceil forward, identity backward:
dq.grid), in three optax parameter groups (weights by SGD, gates and quantizer parameters by Adam). After every
step the DQ parameters are projected into their box (dq.project). The last epoch is read out:

    per prunable conv: channel mask = the gate's keep_mask (a chain's members: prefixes of one mask); bits
    (b_w, b_a) derived from its DQ parameters (32/32 for the convs DQ does not quantize); quantizer
    {'name': 'picpq', 'dq_weight_step', 'dq_weight_range', 'dq_act_step', 'dq_act_range'} (the learned grids,
    for the record); variables: the kernels and BatchNorm with each kept channel's mu folded into its
    BatchNorm scale and bias (exact: the gate multiplies the BatchNorm output), gate and DQ parameters dropped.

So the policy is exactly PIC-PQ's masks and bits: the shared fine-tuning (gates and bits frozen), cost ledger,
export and report serve it unchanged. They quantize with PIC-PQ's quantizers at DJPQ's bits: the export has no
DQ grid (its activation quantizer has PIC-PQ's fixed [0, 1] range), so the learned steps are recorded in the
policy and not used after the readout.

Resumable: training checkpoints every epoch under <workdir>/djpq; the readout is policy.json and
djpq_readout.json, after which a rerun reads them and the last checkpoint without training.

Settings: `config.djpq` (configs/common.py, `add_djpq_config`, whose docstring marks the paper's, the code's
and our choices).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from tqdm import tqdm

from picpq_jax import checkpoints, cost, data, dq, gates, models, training
from picpq_jax import policy as policy_lib
from picpq_jax.methods import Context, Result
from picpq_jax.metrics import MetricWriter
from picpq_jax.models.layers import BN_MOMENTUM, DQ_LEAVES

NAME = 'djpq'
SECTION = 'djpq'
STAGE = 'djpq'  # checkpoints under <workdir>/djpq
READOUT_FILE = 'djpq_readout.json'
FULL_PRECISION = 32
MAX_BITS = 16  # the largest max_bits accepted (PIC-PQ's export packs codes of up to 16 bits in int16)
GATE_LEAVES = ('mu', 'log_sigma2')
SURROGATE_LEAVES = GATE_LEAVES + DQ_LEAVES  # the leaves that are not network weights

PROVENANCE = (
    '[paper] structured pruning by VIB channel gates and mixed precision by learned bit-widths, trained together '
    'in one run against a BOPs target; DJPQ-restrict: bit-widths restricted to powers of two',
    '[code: VIBNet ib_layers.py] the gate: mu ~ N(1, 0.01), log sigma^2 ~ N(-9, 0.01), z = mu + eps sigma per '
    'example and channel in training, mu where log alpha < 0 (else 0) at test, KL_l = 0.5 kl_mult H W '
    'sum log(1 + mu^2/sigma^2) with kl_mult = 1/H; gamma ~ 1e-5',
    '[code: sony mixed-precision-dnns] DQ: step d and range q_max per tensor for weights and activations, bits '
    'derived (b_w = ceil(log2(q_max/d + 1)) + 1, b_a without the + 1), straight-through rounding, d in '
    '[2^-8, 1] for weights, the init for b bits',
    '[ours] loss = cross-entropy + gamma sum KL + beta relu(BOPs/BOPs_dense - 1/target)^2, BOPs from cost.bops '
    'of the hard kept counts (sigmoid surrogate gradient, straight-through) at the derived bits (ceil with an '
    'identity gradient); weights by SGD, gates and DQ parameters by Adam, in three optax groups',
    '[ours] a chain shares one gate (members use its first n channels); the gate multiplies the BatchNorm '
    'output (the mask\'s place; VIBNet: after the activation, the same for z >= 0); at least one channel per '
    'layer stays',
    '[ours] DQ box: activations\' d in [2^-8, 1] too, q_max/d kept within min_bits..max_bits; signed inputs '
    'use the weights\' symmetric grid; DJPQ-restrict snaps bits up to a power of two and recomputes d',
    '[ours] stem (and every B_max-32 conv) and classifier at 32 bits, PIC-PQ\'s convention; the paper\'s '
    'learnable weight exponent (not public) is not implemented',
    '[ours] the last epoch is read out to PIC-PQ\'s masks and bits (mu folded into BatchNorm), then the shared '
    'fine-tuning with gates and bits frozen, with PIC-PQ\'s quantizers at those bits',
    '[ours] epochs, learning rates (BASELINES.md: Adam 1e-3 for gates and DQ), beta, the surrogate temperature, '
    'the init bits (8 by default), the bits box 2..8, the target',
)


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _finite(v) -> bool:
  return _is_number(v) and math.isfinite(v)


def quantized_layers(topology) -> tuple[str, ...]:
  """The convs DQ quantizes: those whose B_max is below 32 (the stem stays 32-bit, PIC-PQ's convention)."""
  return tuple(l.name for l in topology.layers if l.b_max < FULL_PRECISION)


def settings(cfg: ml_collections.ConfigDict) -> dq.Settings:
  return dq.Settings(init_bits=int(cfg.init_bits), min_bits=int(cfg.min_bits), max_bits=int(cfg.max_bits),
                     restrict=bool(cfg.restrict))


def floor_bits(topology, min_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """(w_bits, a_bits), (L,) each: min_bits for the convs DQ quantizes, 32 for the others (the lowest bits)."""
  quantized = set(quantized_layers(topology))
  bits = np.array([min_bits if n in quantized else FULL_PRECISION for n in topology.names], np.float32)
  return bits, bits


def dense_bops(topology) -> float:
  """BOPs of the dense FP32 model (every channel, 32 x 32 bits), the ledger's bops_dense."""
  full = np.full(topology.num_layers, FULL_PRECISION, np.float32)
  return float(cost.bops(topology, cost.dense_keep(topology), full, full))


def max_bops_ratio(topology, min_bits: int) -> float:
  """Dense FP32 BOPs / the BOPs of one channel per layer at min_bits (32 where DQ does not quantize): the
  largest BOPs ratio DJPQ can reach."""
  w, a = floor_bits(topology, min_bits)
  return dense_bops(topology) / float(cost.bops(topology, np.ones(topology.num_layers, np.float32), w, a))


def check_config(config: ml_collections.ConfigDict, topology=None) -> None:
  """ValueError of one sentence naming the key for a setting DJPQ cannot run with, before any training.

  topology: the model's (B_max applied); with it, a BOPs target above what one channel per layer at min_bits
  gives is refused."""
  d = config.djpq
  if not _is_int(d.epochs) or d.epochs < 1:
    raise ValueError(f'djpq.epochs={d.epochs!r} must be an integer >= 1 (the epochs of DJPQ\'s training).')
  if not _is_int(d.batch_size) or d.batch_size < 1:
    raise ValueError(f'djpq.batch_size={d.batch_size!r} must be a positive integer.')
  training.check_batch_size(d.batch_size, 'djpq.batch_size')
  if not _is_int(d.precise_bn_batches) or d.precise_bn_batches < 0:
    raise ValueError(f'djpq.precise_bn_batches={d.precise_bn_batches!r} must be an integer >= 0 (0 keeps the '
                     'running BatchNorm statistics).')
  if not _finite(d.learning_rate) or d.learning_rate <= 0:
    raise ValueError(f'djpq.learning_rate={d.learning_rate!r} must be a finite number > 0.')
  for name, g in d.groups.items():
    if g.get('optimizer', d.optimizer) not in training.OPTIMIZERS:
      raise ValueError(f'djpq.groups.{name}.optimizer={g.get("optimizer")!r} is not an optimizer; choose one of '
                       f'{list(training.OPTIMIZERS)}.')
    if not _finite(g.learning_rate) or g.learning_rate <= 0:
      raise ValueError(f'djpq.groups.{name}.learning_rate={g.learning_rate!r} must be a finite number > 0.')
    if not _finite(g.weight_decay) or g.weight_decay < 0:
      raise ValueError(f'djpq.groups.{name}.weight_decay={g.weight_decay!r} must be a finite number >= 0.')
  for key in ('gamma', 'beta'):
    v = d[key]
    if not _finite(v) or v < 0:
      raise ValueError(f'djpq.{key}={v!r} must be a finite number >= 0 (the weight of the '
                       f'{"KL" if key == "gamma" else "BOPs"} term; 0 turns it off).')
  if not _finite(d.gate_threshold):
    raise ValueError(f'djpq.gate_threshold={d.gate_threshold!r} must be a finite number (a channel is pruned '
                     'where log alpha >= it; 0 as in VIBNet).')
  if not _finite(d.surrogate_temperature) or d.surrogate_temperature <= 0:
    raise ValueError(f'djpq.surrogate_temperature={d.surrogate_temperature!r} must be a finite number > 0 (the '
                     'scale of log alpha in the sigmoid of the kept-channel surrogate, e.g. 1).')
  if not _is_int(d.min_bits) or not 2 <= d.min_bits <= MAX_BITS:
    raise ValueError(f'djpq.min_bits={d.min_bits!r} must be an integer in 2..{MAX_BITS}.')
  if not _is_int(d.max_bits) or not d.min_bits <= d.max_bits <= MAX_BITS:
    raise ValueError(f'djpq.max_bits={d.max_bits!r} must be an integer in djpq.min_bits={d.min_bits}..{MAX_BITS}.')
  if not _is_int(d.init_bits) or not d.min_bits <= d.init_bits <= d.max_bits:
    raise ValueError(f'djpq.init_bits={d.init_bits!r} must be an integer in djpq.min_bits..djpq.max_bits '
                     f'({d.min_bits}..{d.max_bits}).')
  if not isinstance(d.restrict, bool):
    raise ValueError(f'djpq.restrict={d.restrict!r} must be True (DJPQ-restrict: powers-of-two bits) or False.')
  if d.restrict and d.max_bits & (d.max_bits - 1):
    raise ValueError(f'djpq.max_bits={d.max_bits} must be a power of two (2, 4, 8, 16) with djpq.restrict=True, '
                     'which snaps bits up to powers of two.')
  target = d.target_bops_ratio
  if not _finite(target) or target <= 1:
    raise ValueError(f'djpq.target_bops_ratio={target!r} must be a finite number > 1 (dense FP32 BOPs / the '
                     'compressed model\'s, e.g. 50).')
  if topology is not None:
    reachable = max_bops_ratio(topology, d.min_bits)
    if target > reachable:
      raise ValueError(f'djpq.target_bops_ratio={target!r} cannot be reached: one channel per layer at '
                       f'djpq.min_bits={d.min_bits} bits gives {reachable:.4g}x fewer BOPs than the dense '
                       f'{topology.arch}; choose a target below that.')


# ----------------------------------------------------------------------------------------------------------
# The model and its variables
# ----------------------------------------------------------------------------------------------------------


def djpq_model(config: ml_collections.ConfigDict, info, topology) -> models.Net:
  """The baseline's architecture with a VIB gate per chain and free conv and DQ in every quantized conv."""
  d = config.djpq
  return models.create_model(config.model.arch, info.num_classes, info.image_size, info.in_channels,
                             quantizer='djpq', dq_layers=quantized_layers(topology), dq_settings=settings(d),
                             gate_threshold=float(d.gate_threshold))


def initial_variables(model: models.Net, baseline: Mapping[str, Any], seed: int = 0) -> dict:
  """The djpq model's variables: every kernel, BatchNorm and dense variable from `baseline`, the gates at their
  random init (key `seed`), and each quantized conv's DQ parameters initialised for init_bits from the
  BASELINE's kernel (dq.init_weight_grid). ValueError if the baseline is not of this architecture."""
  spec = model.spec
  x = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_channels), jnp.float32)
  init = jax.device_get(model.init(jax.random.key(seed), x, train=False))
  out = {}
  for collection in ('params', 'batch_stats'):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(init[collection]))
    base = traverse_util.flatten_dict(flax.core.unfreeze(baseline[collection]))
    for key, value in base.items():
      if key not in flat or np.shape(flat[key]) != np.shape(value):
        raise ValueError(f'the baseline\'s {collection} entry {"/".join(key)} (shape {np.shape(value)}) has no '
                         f'place in {spec.arch}\'s DJPQ model; use the baseline of model.arch={spec.arch!r}.')
      flat[key] = np.asarray(value)
    out[collection] = traverse_util.unflatten_dict(flat)
  bits = model.dq_settings.init_bits if model.dq_settings else 8
  for name in model.dq_layers:
    step, qmax = dq.init_weight_grid(jnp.asarray(out['params'][name]['kernel']), bits)
    out['params'][name]['w_step'], out['params'][name]['w_range'] = np.float32(step), np.float32(qmax)
  return out


def signed_inputs(model: models.Net) -> frozenset:
  """Names of the convs whose input is signed (no ReLU before it): their activation grid is symmetric."""
  return frozenset(c.name for c in model.spec.convs if c.signed_input or c.source is None)


# ----------------------------------------------------------------------------------------------------------
# The loss terms: pure functions of the params
# ----------------------------------------------------------------------------------------------------------


def kept_channels(params: Mapping[str, Any], topology, threshold: float, temperature: float) -> jax.Array:
  """(L,) float32 kept channels per prunable conv, forward order: the hard count of each member's prefix of its
  gate's keep_mask, with the sigmoid surrogate's gradient (gates.kept_surrogate)."""
  counts = {}
  for g in gates.groups(topology.layers):
    p = params[g.name]
    s = gates.kept_surrogate(p['mu'], p['log_sigma2'], threshold, temperature, g.member_widths)
    for layer, n in g.members:
      counts[layer] = jnp.sum(s[:n])
  return jnp.stack([counts[n] for n in topology.names])


def layer_grids(params: Mapping[str, Any], model: models.Net) -> dict[str, tuple[dq.Grid, dq.Grid]]:
  """layer name -> (weight grid, activation grid) of every conv DQ quantizes (dq.grid of its parameters)."""
  restrict = bool(model.dq_settings and model.dq_settings.restrict)
  signed = signed_inputs(model)
  out = {}
  for name in model.dq_layers:
    p = params[name]
    out[name] = (dq.grid(p['w_step'], p['w_range'], signed=True, restrict=restrict),
                 dq.grid(p['a_step'], p['a_range'], signed=name in signed, restrict=restrict))
  return out


def layer_bits(params: Mapping[str, Any], model: models.Net, topology) -> tuple[jax.Array, jax.Array]:
  """((L,), (L,)) float32 weight and activation bits per prunable conv, forward order: DQ's derived bits (ceil
  forward, identity gradient) where DQ quantizes, 32 elsewhere."""
  grids = layer_grids(params, model)
  full = jnp.float32(FULL_PRECISION)
  w = [grids[n][0].bits if n in grids else full for n in topology.names]
  a = [grids[n][1].bits if n in grids else full for n in topology.names]
  return jnp.stack(w), jnp.stack(a)


def bops(params: Mapping[str, Any], model: models.Net, topology, threshold: float,
         temperature: float) -> jax.Array:
  """Scalar BOPs of the gates' kept channels at the derived bits: `cost.bops` (the one ledger), differentiable
  through the surrogates. Its forward value is the readout policy's ledger BOPs."""
  w, a = layer_bits(params, model, topology)
  return cost.bops(topology, kept_channels(params, topology, threshold, temperature), w, a)


def bops_penalty(ratio: jax.Array, target: float) -> jax.Array:
  """relu(ratio - 1 / target)^2; ratio = BOPs / BOPs_dense, target = the BOPs compression asked for."""
  return jax.nn.relu(ratio - 1.0 / target) ** 2


def kl_penalty(params: Mapping[str, Any], topology) -> jax.Array:
  """Scalar sum over gated layers of gates.kl_divergence over the layer's own channels (its prefix of its gate)
  and its output map H_l x W_l, kl_mult = 1/H_l."""
  total = jnp.float32(0.0)
  for g in gates.groups(topology.layers):
    p = params[g.name]
    for layer, n in g.members:
      l = topology.layer(layer)
      total = total + gates.kl_divergence(p['mu'][:n], p['log_sigma2'][:n], l.out_height, l.out_width)
  return total


def make_loss(model: models.Net, topology, cfg: ml_collections.ConfigDict) -> Callable:
  """(params, batch_stats, batch, key) -> (loss, (logits, new batch_stats, terms)): training-mode forward with
  gate noise from `key`; terms = {'cross_entropy', 'kl', 'bops', 'bops_ratio', 'bops_penalty'} (scalars)."""
  reference = dense_bops(topology)
  threshold, temperature = float(cfg.gate_threshold), float(cfg.surrogate_temperature)
  gamma, beta, target = float(cfg.gamma), float(cfg.beta), float(cfg.target_bops_ratio)

  def loss(params, batch_stats, batch, key):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'], train=True,
                                  mutable=['batch_stats'], rngs={gates.RNG: key})
    ce = training.cross_entropy(logits, batch['label'])
    kl = kl_penalty(params, topology)
    b = bops(params, model, topology, threshold, temperature)
    ratio = b / reference
    penalty = bops_penalty(ratio, target)
    terms = {'cross_entropy': ce, 'kl': kl, 'bops': b, 'bops_ratio': ratio, 'bops_penalty': penalty}
    return ce + gamma * kl + beta * penalty, (logits, updates['batch_stats'], terms)

  return loss


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax.multi_transform over cfg.groups (name -> {optimizer, learning_rate, weight_decay, leaves}; leaves
  labelled by training.group_labels): each group its own optimizer (training.make_optimizer of a one-group
  section), its learning rate following `schedule` scaled by group.learning_rate / cfg.learning_rate."""
  transforms = {}
  for name, g in cfg.groups.items():
    section = ml_collections.ConfigDict({
        'optimizer': g.get('optimizer', cfg.optimizer), 'learning_rate': g.learning_rate,
        'weight_decay': g.weight_decay, 'momentum': cfg.momentum, 'nesterov': cfg.nesterov,
        'groups': ml_collections.ConfigDict()})
    scale = g.learning_rate / cfg.learning_rate
    transforms[name] = training.make_optimizer(section, lambda step, scale=scale: schedule(step) * scale)
  return optax.multi_transform(transforms, training.group_labels(cfg.groups))


def project(params: Mapping[str, Any], model: models.Net) -> dict:
  """params with every quantized conv's (d, q_max) pairs moved into DQ's box (dq.project)."""
  s = model.dq_settings
  signed = signed_inputs(model)
  params = dict(params)
  for name in model.dq_layers:
    p = dict(params[name])
    p['w_step'], p['w_range'] = dq.project(p['w_step'], p['w_range'], signed=True, min_bits=s.min_bits,
                                           max_bits=s.max_bits)
    p['a_step'], p['a_range'] = dq.project(p['a_step'], p['a_range'], signed=name in signed,
                                           min_bits=s.min_bits, max_bits=s.max_bits)
    params[name] = p
  return params


def make_train_step(model: models.Net, topology, cfg: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation) -> Callable:
  """(state, batch, noise) -> (state, metrics): one step on the DJPQ loss, then the DQ box projection. The
  step's gate noise is drawn with fold_in(noise, state.step), so a resumed run draws what an uninterrupted
  one would."""
  loss = make_loss(model, topology, cfg)

  def step(state: training.TrainState, batch, noise):
    key = jax.random.fold_in(noise, state.step)
    (total, (logits, batch_stats, terms)), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, state.batch_stats, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = project(optax.apply_updates(state.params, updates), model)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new, {'loss': total, 'accuracy': accuracy, **terms}

  return step


def make_batch_stats_step(model: models.Net) -> Callable:
  """training.make_batch_stats_step for the gated model (its training-mode forward needs gate noise)."""

  def batch_stats_step(variables, images, key):
    zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
    _, updates = model.apply({'params': variables['params'], 'batch_stats': zeros}, images, train=True,
                             mutable=['batch_stats'], rngs={gates.RNG: key})
    return jax.tree.map(lambda s: s / (1.0 - BN_MOMENTUM), updates['batch_stats'])

  return batch_stats_step


def train(config: ml_collections.ConfigDict, workdir: str, model: models.Net, topology,
          init_variables: Mapping[str, Any]) -> dict:
  """Train the djpq model for config.djpq.epochs on config.data, checkpointing every epoch under
  <workdir>/djpq and resuming from the latest checkpoint there (epoch e's batches and gate noise depend only on
  the seed, e and the step). Returns {'state' (replicated), 'history' (one row per epoch), 'wall_time_s'}.

  Each epoch's validation runs the test-time model (deterministic gates, DQ), after precise BatchNorm
  statistics on djpq.precise_bn_batches training batches when > 0."""
  cfg = config.djpq
  training.check_batch_size(cfg.batch_size, 'djpq.batch_size')
  mesh = training.data_mesh()
  steps_per_epoch = data.steps_per_epoch(config.data, 'train', cfg.batch_size)
  schedule = training.make_schedule(cfg, steps_per_epoch)
  tx = make_optimizer(cfg, schedule)
  params = jax.tree.map(jnp.asarray, init_variables['params'])
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              batch_stats=jax.tree.map(jnp.asarray, init_variables['batch_stats']),
                              opt_state=tx.init(params))
  meta_expect = {'arch': config.model.arch, 'stage': STAGE}
  mngr = checkpoints.manager(os.path.join(workdir, STAGE), max_to_keep=2)
  start_epoch, history = 0, []
  if checkpoints.latest_step(mngr) is not None:
    state, meta = checkpoints.restore(mngr, state, expect=meta_expect)
    start_epoch, history = meta['epoch'] + 1, meta.get('history', [])
  state = training.replicate(state, mesh)
  # The gates' noise: its own streams (training steps, precise BatchNorm), apart from the init's.
  noise = jax.random.fold_in(jax.random.key(config.seed), 0x6a7)
  bn_noise = jax.random.fold_in(jax.random.key(config.seed), 0x6a8)
  train_step = jax.jit(make_train_step(model, topology, cfg, tx), donate_argnums=0)
  eval_step = jax.jit(training.make_eval_step(model))
  if cfg.precise_bn_batches:
    bn_images = data.fixed_batches(config.data, 'train', cfg.batch_size, cfg.precise_bn_batches,
                                   seed=config.seed, train=False)['image']
    stats_step = jax.jit(make_batch_stats_step(model))
  writer = MetricWriter(workdir, name=STAGE)
  writer.keep_rows(lambda row: row.get('epoch', 0) <= start_epoch)  # an epoch redone replaces its row
  t_start = time.time()
  for epoch in range(start_epoch, cfg.epochs):
    t0, sums = time.time(), None
    bar = tqdm(data.epoch_batches(config.data, 'train', cfg.batch_size, train=True, epoch=epoch, seed=config.seed),
               total=steps_per_epoch, desc=f'{STAGE} epoch {epoch + 1}/{cfg.epochs}', leave=False)
    for batch in bar:
      state, m = train_step(state, training.shard_batch(batch, mesh), noise)
      sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    means = {k: float(v) / steps_per_epoch for k, v in jax.device_get(sums).items()}
    if not math.isfinite(means['loss']):
      raise FloatingPointError(f'{STAGE}: the training loss became {means["loss"]} in epoch {epoch + 1}; lower '
                               f'djpq.learning_rate (now {cfg.learning_rate}) or djpq.beta (now {cfg.beta}).')
    if cfg.precise_bn_batches:
      stats = [stats_step(state.variables, training.shard_batch({'image': b}, mesh)['image'],
                          jax.random.fold_in(bn_noise, i)) for i, b in enumerate(bn_images)]
      state = state.replace(batch_stats=jax.tree.map(lambda *s: sum(s) / len(s), *stats))
    val = training.evaluate(eval_step, state.variables,
                            data.epoch_batches(config.data, 'validation', cfg.eval_batch_size, train=False), mesh)
    now = end_of_training(jax.device_get(state.params), model, topology, cfg)
    row = {'epoch': epoch + 1, 'train_loss': means['loss'], 'train_accuracy': means['accuracy'],
           'cross_entropy': means['cross_entropy'], 'kl': means['kl'], 'val_loss': val['loss'],
           'val_accuracy': val['accuracy'], 'bops_compression': now['bops_compression'],
           'kept_channels': now['kept_channels'], 'mean_weight_bits': now['mean_weight_bits'],
           'mean_act_bits': now['mean_act_bits'], 'seconds': time.time() - t0}
    history.append(row)
    step = int(jax.device_get(state.step))
    writer.write(step, 'epoch', row)
    tqdm.write(f'{STAGE} epoch {epoch + 1}: loss {means["loss"]:.4f} (ce {means["cross_entropy"]:.4f}) val acc '
               f'{val["accuracy"]:.4f} BOPs {now["bops_compression"]:.1f}x (target {cfg.target_bops_ratio}x), '
               f'{now["kept_channels"]} channels, bits w {now["mean_weight_bits"]:.2f} a {now["mean_act_bits"]:.2f}')
    checkpoints.save(mngr, step, state, {**meta_expect, 'epoch': epoch, 'history': history})
  return {'state': state, 'history': history, 'wall_time_s': time.time() - t_start}


def end_of_training(params: Mapping[str, Any], model: models.Net, topology,
                    cfg: ml_collections.ConfigDict) -> dict:
  """The BOPs term's forward value for `params` and what it counts: {'bops', 'bops_compression',
  'bops_penalty', 'kept_channels' (total), 'mean_weight_bits', 'mean_act_bits' (over DQ's convs)}."""
  threshold, temperature = float(cfg.gate_threshold), float(cfg.surrogate_temperature)
  b = float(bops(params, model, topology, threshold, temperature))
  keep = np.asarray(kept_channels(params, topology, threshold, temperature))
  w, a = (np.asarray(x) for x in layer_bits(params, model, topology))
  quantized = np.array([n in model.dq_layers for n in topology.names])
  reference = dense_bops(topology)
  return {'bops': b, 'bops_compression': reference / b,
          'bops_penalty': float(bops_penalty(b / reference, float(cfg.target_bops_ratio))),
          'kept_channels': int(keep.sum()),
          'mean_weight_bits': float(w[quantized].mean()) if quantized.any() else float(FULL_PRECISION),
          'mean_act_bits': float(a[quantized].mean()) if quantized.any() else float(FULL_PRECISION)}


# ----------------------------------------------------------------------------------------------------------
# Readout
# ----------------------------------------------------------------------------------------------------------


def gate_values(params: Mapping[str, Any], topology, threshold: float) -> dict[str, np.ndarray]:
  """layer name -> (out_channels,) float32 test-time gate (mu on kept channels, 0 on pruned): the member's
  prefix of its gate's gates.deterministic."""
  out = {}
  for g in gates.groups(topology.layers):
    p = params[g.name]
    z = np.asarray(gates.deterministic(jnp.asarray(p['mu']), jnp.asarray(p['log_sigma2']), threshold,
                                       g.member_widths), np.float32)
    for layer, n in g.members:
      out[layer] = z[:n]
  return out


def fold_gates(variables: Mapping[str, Any], gate: Mapping[str, np.ndarray]) -> dict:
  """The plain network's variables: each conv's BatchNorm scale and bias multiplied by its test-time gate
  (mu * BN(x) = BN'(x) with scale' = mu scale, bias' = mu bias, in training and test mode alike), and the gate
  and DQ parameters dropped. With the gate's 0/1 masks, the plain Net then computes the gated net's test-time
  function (up to the quantizers)."""
  params = {}
  for name, value in variables['params'].items():
    if name.startswith('gate_'):
      continue
    if isinstance(value, Mapping):
      value = {k: v for k, v in value.items() if k not in SURROGATE_LEAVES}
      if name in gate:
        z = np.asarray(gate[name], np.float32)
        value['bn'] = {k: np.asarray(v, np.float32) * z for k, v in value['bn'].items()}
    params[name] = value
  return {'params': params, 'batch_stats': variables['batch_stats']}


def readout(model: models.Net, topology, variables: Mapping[str, Any], cfg: ml_collections.ConfigDict,
            arch: str, dataset: str, run_settings: Optional[Mapping[str, Any]] = None
            ) -> tuple[policy_lib.Policy, dict, dict]:
  """(Policy, summary, folded variables) of a trained djpq model (see the module docstring).

  summary: 'bops_loss_term' (the BOPs term's forward value, end_of_training), 'layers' (per conv: kept
  channels, weight and activation bits, and the DQ grids of the quantized ones)."""
  params = jax.device_get(variables['params'])
  threshold = float(cfg.gate_threshold)
  gate = gate_values(params, topology, threshold)
  grids = jax.device_get(layer_grids(params, model))
  masks, bits, quantizers, layers = {}, {}, {}, {}
  for name in topology.names:
    masks[name] = (gate[name] != 0).astype(np.float32)
    entry = {'kept': int(masks[name].sum())}
    if name in grids:
      wg, ag = grids[name]
      bits[name] = (int(wg.bits), int(ag.bits))
      quantizers[name] = {'name': policy_lib.DEFAULT_QUANTIZER, 'dq_weight_step': float(wg.step),
                          'dq_weight_range': float(wg.qmax), 'dq_act_step': float(ag.step),
                          'dq_act_range': float(ag.qmax)}
      entry.update(weight_bits=bits[name][0], act_bits=bits[name][1],
                   **{k: v for k, v in quantizers[name].items() if k != 'name'})
    else:
      bits[name] = (FULL_PRECISION, FULL_PRECISION)
      entry.update(weight_bits=FULL_PRECISION, act_bits=FULL_PRECISION)
    layers[name] = entry
  policy = policy_lib.from_masks_and_bits(arch, dataset, NAME, masks, bits, settings=run_settings,
                                          quantizers=quantizers)
  summary = {'bops_loss_term': end_of_training(params, model, topology, cfg), 'layers': layers}
  return policy, summary, fold_gates({'params': params, 'batch_stats': variables['batch_stats']}, gate)


def _settings(cfg: ml_collections.ConfigDict) -> dict:
  return {'target_bops_ratio': cfg.target_bops_ratio, 'gamma': cfg.gamma, 'beta': cfg.beta,
          'gate_threshold': cfg.gate_threshold, 'surrogate_temperature': cfg.surrogate_temperature,
          'init_bits': cfg.init_bits, 'min_bits': cfg.min_bits, 'max_bits': cfg.max_bits, 'restrict': cfg.restrict,
          'epochs': cfg.epochs,
          'groups': {name: {'optimizer': g.get('optimizer', cfg.optimizer), 'learning_rate': g.learning_rate,
                            'weight_decay': g.weight_decay} for name, g in cfg.groups.items()}}


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------


def run(context: Context) -> Result:
  """Train the djpq model from the baseline (resumable), read its last epoch out to a Policy and the plain
  network's variables (mu folded into BatchNorm); fine-tuning is the shared loop."""
  config, workdir, info, topo = context.config, context.workdir, context.info, context.topology
  cfg = config.djpq
  model = djpq_model(config, info, topo)
  readout_path = os.path.join(workdir, READOUT_FILE)
  t0 = time.time()
  if os.path.exists(readout_path):
    variables = training.load_variables(workdir, STAGE, config)
    summary = checkpoints.read_json(readout_path)
    policy = policy_lib.read_policy(os.path.join(workdir, policy_lib.POLICY_FILE), config.model.arch)
    _, _, folded = readout(model, topo, variables, cfg, config.model.arch, info.name)
    return Result(policy=policy, model=context.model, variables=folded, summary=summary)
  init = initial_variables(model, context.baseline, config.seed)
  trained = train(config, workdir, model, topo, init)
  variables = training.load_variables(workdir, STAGE, config)
  policy, summary, folded = readout(model, topo, variables, cfg, config.model.arch, info.name, _settings(cfg))
  ledger = cost.ledger(topo, policy)
  policy = policy_lib.replace_summary(policy, ledger)
  last = trained['history'][-1] if trained['history'] else {}
  summary.update({
      'target_bops_ratio': float(cfg.target_bops_ratio), 'bops_ratio': ledger['bops_compression'],
      'bops_ratio_gap': ledger['bops_compression'] / float(cfg.target_bops_ratio) - 1.0,
      'val_accuracy_before_finetune': last.get('val_accuracy'), 'epochs': int(cfg.epochs),
      'history': trained['history'], 'wall_time_s': time.time() - t0})
  # The policy first: a readout file on disk means the whole readout is there.
  policy_lib.write_policy(workdir, policy)
  checkpoints.write_json(readout_path, summary)
  return Result(policy=policy, model=context.model, variables=folded, summary=summary)
