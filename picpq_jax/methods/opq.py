"""OPQ-style (BASELINES.md, "OPQ"): one-shot pruning and quantization allocation from the pretrained weights.

"OPQ-style", everywhere: OPQ (Hu et al., AAAI 2021) publishes no code and its equations are not available to
us, so this is the reconstruction of BASELINES.md built only from the ingredients the paper names (a Laplace
model of the weights, one global magnitude threshold, one global quantization step, unified channel-wise
quantization, masks and steps frozen while the weights are fine-tuned with straight-through rounding).

The allocation (`allocate`, a pure function of the baseline params and two budgets; no data, no training),
over the ALLOCATED layers: every prunable conv whose B_max is below 32. The stem and any other B_max-32 layer
(MobileNetV2's last conv) stay dense and at 32 bits, and the classifier at 32 bits: PIC-PQ's convention,
which the cost ledger assumes for every method (BASELINES.md, "A common cost ledger"); the budgets are
measured over the allocated layers only.

  Pruning. b_l = mean |W_l| (the maximum-likelihood scale of a Laplace(0, b_l) fit). One magnitude threshold
  t for all layers; the Laplace model predicts the pruned fraction p_l = 1 - exp(-t / b_l); t is found by
  bisection so that sum_l n_l p_l / sum_l n_l = P (n_l: the layer's weight count). Mask = |W| >= t. On
  Laplace weights the masks' sparsity is p_l; on real weights it is what the weights give (reported beside
  the analytic figure, `Allocation.sparsity` and `.analytic_sparsity`).

  Unified channel-wise scaling. s_c = max |W_c| over output channel c's surviving weights (r_l for a channel
  with none: its codes are all 0). Every channel is divided by its s_c and all channels of the layer share
  one grid; s_c multiplies back after the conv, and is folded into the following BatchNorm at export.

  Quantization. r_l = max |W| of the layer's survivors, measured BEFORE the channel scaling. One global step
  Delta in weight units; bits_l = ceil(log2(2 r_l / Delta + 1)), clamped to 2..16 (2: the fewest bits whose
  mid-tread grid has a level besides 0; 16: codes exported in int16). Delta is found by bisection (in log
  Delta) as the smallest step whose average bits, weighted by each layer's SURVIVING weights, is <= the
  target: the budget is met from below and is the tightest such allocation (a step smaller by 1e-9 relative
  would exceed it). The layer's shared grid in scaled units has step Delta / r_l (its widest channel is
  quantized with step Delta exactly, narrower ones finer) and codes in [-Q_l, Q_l], Q_l = 2^(bits_l-1) - 1;
  a layer whose bits were clamped uses step 1 / Q_l (its top level at the widest channel's max).

  Why r_l before the scaling: after it every channel's max is 1, so r_l = 1 in every layer and every layer
  would get the same bits: the per-layer bit allocation, which the one-Delta (equal-slope Lagrange, high-rate)
  solution exists for, would vanish. The Lagrange argument is about the squared error of the weights as they
  are, so the ranges are measured there; the channel-wise scaling is then applied within the layer at no cost
  in bits, and only makes the narrower channels' steps finer.

The Policy: per allocated layer the weight mask (kernel-shaped 0/1), weight bits, act bits
(`config.opq.act_bits`, 32 as published) and quantizer {'name': 'opq', 'step': the grid step in scaled
units, 'scales': [s_c, ...], 'enforce_weight_mask': True} (the masks multiply the quantized kernel during
fine-tuning, so pruned weights get no gradient and stay exactly 0). Channel masks are all ones (OPQ prunes
weights, not channels). The Result's model is the baseline's architecture with the 'opq' quantizer
(quant.opq_quant) at those steps and scales, frozen; its variables are the baseline's with the pruned weights
zeroed. Fine-tuning is the shared loop (pipeline.finetune).

Resumable: policy.json (+ policy_weight_masks.npz) and opq_allocation.json in the workdir; a rerun rebuilds
the model from the policy without allocating again.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np

from picpq_jax import checkpoints, cost, models
from picpq_jax import policy as policy_lib
from picpq_jax.methods import Context, Result

NAME = 'opq'
SECTION = 'opq'
QUANTIZER = 'opq'
SUMMARY_FILE = 'opq_allocation.json'
FULL_PRECISION = 32
MIN_BITS = 2  # a mid-tread grid of 1 bit has only the level 0
MAX_BITS = 16  # codes are exported in int16 at most
BISECTION_STEPS = 200

PROVENANCE = (
    '[paper] one-shot allocation from the pretrained weights alone: weight-level magnitude masks, one '
    'quantization step per layer, masks and steps frozen, only the weights fine-tuned with straight-through '
    'rounding',
    '[paper, 2nd] a Laplace model of the weights and a Lagrange solution under a global budget; the paper\'s '
    'equations are not available to us: everything below is OUR reconstruction, named "OPQ-style"',
    '[ours] Laplace fit b_l = mean|W_l|; one global threshold t, p_l = 1 - exp(-t/b_l), t by bisection so that '
    'the weight-count-weighted mean of p_l is the sparsity budget; mask = |W| >= t',
    '[ours] one global step Delta (high-rate theory), bits_l = ceil(log2(2 r_l/Delta + 1)) with r_l the max '
    '|W| of the survivors BEFORE channel scaling, clamped to 2..16; Delta by bisection: the smallest with '
    'average bits (weighted by surviving weights) <= the budget',
    '[paper: unified channel-wise quantization; ours: its form] each output channel divided by its max |W|, '
    'all channels of a layer on one grid, the scales folded into the following BatchNorm at export',
    '[ours] stem, B_max-32 layers and classifier dense at 32 bits (PIC-PQ\'s convention, the ledger\'s)',
    '[paper] activations 32-bit; [ours] opq.act_bits < 32 uses PIC-PQ\'s activation quantizer',
)


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_budgets(sparsity: Any, avg_bits: Any, key: str = 'opq') -> None:
  """ValueError of one sentence naming the key for a budget the allocation cannot meet."""
  if not _is_number(sparsity) or not math.isfinite(sparsity) or not 0 <= sparsity < 1:
    raise ValueError(f'{key}.sparsity={sparsity!r} must lie in [0, 1): the fraction of the allocated convs\' '
                     'weights to prune, e.g. 0.8.')
  if not _is_number(avg_bits) or not math.isfinite(avg_bits) or not 1 <= avg_bits <= MAX_BITS:
    raise ValueError(f'{key}.avg_bits={avg_bits!r} must lie in 1..{MAX_BITS}: the average weight bits of the '
                     'surviving weights, e.g. 4.')
  if avg_bits < MIN_BITS:
    raise ValueError(f'{key}.avg_bits={avg_bits!r} is below {MIN_BITS}, the fewest bits of a layer\'s mid-tread '
                     f'grid (levels -1, 0, 1); use {MIN_BITS}..{MAX_BITS}.')


def check_config(config: ml_collections.ConfigDict, topology=None) -> None:
  """ValueError of one sentence naming the key for a setting OPQ-style cannot run with, before any work."""
  o = config.opq
  check_budgets(o.sparsity, o.avg_bits)
  if isinstance(o.act_bits, bool) or not isinstance(o.act_bits, (int, np.integer)) or \
      not 2 <= o.act_bits <= FULL_PRECISION:
    raise ValueError(f'opq.act_bits={o.act_bits!r} must be an integer in 2..32 (32: activations not quantized, '
                     'as published).')
  if topology is not None and not allocated_layers(topology):
    raise ValueError(f'model.arch={topology.arch!r} has no prunable conv with B_max below 32 for OPQ-style to '
                     'allocate; set search.b_max below 32 for some layers.')


# ----------------------------------------------------------------------------------------------------------
# The allocation (pure numpy)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerAllocation:
  """One allocated conv. weight_mask: kernel-shaped float32 0/1. bits: weight bits. step: the shared grid's
  step in channel-scaled units. scales: (out_channels,) float32 s_c. laplace_b: b_l. analytic_sparsity: p_l.
  sparsity: the mask's zero fraction. range: r_l (max |W| of survivors, unscaled; 0 if none). clamped: bits
  clamped to 2..16 (step 1 / Q_l then)."""
  weight_mask: np.ndarray
  bits: int
  step: float
  scales: np.ndarray
  laplace_b: float
  analytic_sparsity: float
  sparsity: float
  range: float
  clamped: bool


@dataclasses.dataclass(frozen=True)
class Allocation:
  """What `allocate` decides. threshold: t. global_step: Delta (weight units). layers: name -> LayerAllocation
  (forward order). sparsity / analytic_sparsity: weight-count-weighted mean of the masks' / the Laplace model's
  pruned fractions. avg_bits: the surviving-weight-weighted mean bits (<= avg_bits_target)."""
  threshold: float
  global_step: float
  layers: Mapping[str, LayerAllocation]
  sparsity_target: float
  avg_bits_target: float
  sparsity: float
  analytic_sparsity: float
  avg_bits: float


def allocated_layers(topology) -> list:
  """The prunable convs OPQ-style allocates: those whose B_max is below 32 (forward order)."""
  return [l for l in topology.layers if l.b_max < FULL_PRECISION]


def laplace_pruned_fraction(threshold: float, b: np.ndarray) -> np.ndarray:
  """p_l = 1 - exp(-t / b_l) (1 for a layer of all zeros, b_l = 0, when t > 0)."""
  b = np.asarray(b, np.float64)
  with np.errstate(divide='ignore'):
    return np.where(b > 0, -np.expm1(-threshold / np.where(b > 0, b, 1.0)), float(threshold > 0))


def solve_threshold(b: np.ndarray, counts: np.ndarray, sparsity: float) -> float:
  """The one threshold t with sum_l counts_l p_l(t) / sum counts = sparsity, by bisection (P = 0: t = 0)."""
  if sparsity <= 0:
    return 0.0
  w = np.asarray(counts, np.float64) / np.sum(counts)
  mean_p = lambda t: float(np.dot(w, laplace_pruned_fraction(t, b)))  # noqa: E731
  lo, hi = 0.0, float(max(np.max(b), 1e-30))
  while mean_p(hi) < sparsity:
    hi *= 2.0
  for _ in range(BISECTION_STEPS):
    mid = 0.5 * (lo + hi)
    if mean_p(mid) < sparsity:
      lo = mid
    else:
      hi = mid
    if hi - lo <= 1e-15 * hi:
      break
  return 0.5 * (lo + hi)


def unclamped_bits(ranges: np.ndarray, step: float) -> np.ndarray:
  """ceil(log2(2 r_l / Delta + 1)) per layer, before the 2..16 clamp (float)."""
  return np.ceil(np.log2(2.0 * np.asarray(ranges, np.float64) / step + 1.0))


def layer_bits(ranges: np.ndarray, step: float) -> np.ndarray:
  """bits_l at the global step Delta: ceil(log2(2 r_l / Delta + 1)) clamped to MIN_BITS..MAX_BITS (int)."""
  return np.clip(unclamped_bits(ranges, step), MIN_BITS, MAX_BITS).astype(np.int64)


def average_bits(ranges: np.ndarray, survivors: np.ndarray, step: float) -> float:
  """Mean bits weighted by each layer's surviving weights (0 when nothing survives)."""
  survivors = np.asarray(survivors, np.float64)
  total = survivors.sum()
  return float(np.dot(survivors, layer_bits(ranges, step)) / total) if total > 0 else 0.0


def solve_step(ranges: np.ndarray, survivors: np.ndarray, avg_bits: float) -> float:
  """The smallest global step Delta whose average bits (weighted by survivors) is <= avg_bits, by bisection in
  log Delta (invariant: average(lo) > avg_bits >= average(hi)); returns hi."""
  ranges = np.asarray(ranges, np.float64)
  live = ranges > 0
  if not live.any():
    return 1.0
  r_min, r_max = float(ranges[live].min()), float(ranges[live].max())
  lo = r_min / 2.0 ** (MAX_BITS + 1)  # every live layer at >= 16 bits before the clamp
  hi = 4.0 * r_max  # every layer at <= 1 bit before the clamp (2 after)
  if average_bits(ranges, survivors, lo) <= avg_bits:
    return lo
  if average_bits(ranges, survivors, hi) > avg_bits:
    raise ValueError(f'opq.avg_bits={avg_bits!r} is below {MIN_BITS}, the fewest bits a layer can have.')
  log_lo, log_hi = math.log(lo), math.log(hi)
  for _ in range(BISECTION_STEPS):
    mid = 0.5 * (log_lo + log_hi)
    if average_bits(ranges, survivors, math.exp(mid)) > avg_bits:
      log_lo = mid
    else:
      log_hi = mid
    if log_hi - log_lo < 1e-12:
      break
  return math.exp(log_hi)


def channel_scales(kernel: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """s_c = max |W| over output channel c's surviving entries (last axis, HWIO); a channel with none (its codes
  are all 0, any scale serves) takes the layer's largest, r_l (1 if nothing in the layer survives)."""
  flat = np.abs(np.asarray(kernel, np.float32) * mask).reshape(-1, np.shape(kernel)[-1])
  s = flat.max(axis=0)
  top = s.max() if s.size and s.max() > 0 else 1.0
  return np.where(s > 0, s, top).astype(np.float32)


def allocate(topology, params: Mapping[str, Any], sparsity: float, avg_bits: float) -> Allocation:
  """OPQ-style allocation (module docstring) of the allocated convs' kernels in `params` (the baseline's
  'params' collection) under a global weight sparsity and an average weight-bit budget. Pure; numpy."""
  check_budgets(sparsity, avg_bits)
  layers = allocated_layers(topology)
  kernels = [np.asarray(params[l.name]['kernel'], np.float32) for l in layers]
  absolute = [np.abs(k) for k in kernels]
  counts = np.array([k.size for k in kernels], np.float64)
  b = np.array([a.mean(dtype=np.float64) for a in absolute])
  t = solve_threshold(b, counts, float(sparsity))
  masks = [(a >= t).astype(np.float32) if t > 0 else np.ones_like(a) for a in absolute]
  survivors = np.array([m.sum(dtype=np.float64) for m in masks])
  ranges = np.array([float((a * m).max()) if s > 0 else 0.0 for a, m, s in zip(absolute, masks, survivors)])
  delta = solve_step(ranges, survivors, float(avg_bits))
  raw = unclamped_bits(ranges, delta)
  bits = layer_bits(ranges, delta)
  p = laplace_pruned_fraction(t, b)
  out = {}
  for i, l in enumerate(layers):
    levels = 2 ** (int(bits[i]) - 1) - 1
    clamped = bool(raw[i] != bits[i]) or bool(ranges[i] == 0)
    step = 1.0 / levels if clamped else delta / ranges[i]
    out[l.name] = LayerAllocation(
        weight_mask=masks[i], bits=int(bits[i]), step=float(np.float32(step)),
        scales=channel_scales(kernels[i], masks[i]), laplace_b=float(b[i]), analytic_sparsity=float(p[i]),
        sparsity=float(1.0 - survivors[i] / counts[i]), range=float(ranges[i]), clamped=clamped)
  total = counts.sum()
  return Allocation(threshold=float(t), global_step=float(delta), layers=out, sparsity_target=float(sparsity),
                    avg_bits_target=float(avg_bits), sparsity=float(1.0 - survivors.sum() / total),
                    analytic_sparsity=float(np.dot(counts, p) / total),
                    avg_bits=average_bits(ranges, survivors, delta))


# ----------------------------------------------------------------------------------------------------------
# Policy, model and variables
# ----------------------------------------------------------------------------------------------------------


def layer_quantizer(layer: LayerAllocation) -> dict:
  return {'name': QUANTIZER, 'step': layer.step, 'scales': [float(s) for s in layer.scales],
          policy_lib.ENFORCE_WEIGHT_MASK: True}


def to_policy(allocation: Allocation, topology, arch: str, dataset: str, act_bits: int = FULL_PRECISION,
              settings: Optional[Mapping[str, Any]] = None) -> policy_lib.Policy:
  """The Policy of an allocation: allocated convs with their weight masks, bits (weight, act_bits), 'opq'
  quantizers; every other prunable conv dense at 32/32; channel masks all ones."""
  masks, bits, weight_masks, quantizers = {}, {}, {}, {}
  for l in topology.layers:
    masks[l.name] = np.ones(l.out_channels, np.float32)
    if l.name in allocation.layers:
      a = allocation.layers[l.name]
      bits[l.name] = (a.bits, int(act_bits))
      weight_masks[l.name] = a.weight_mask
      quantizers[l.name] = layer_quantizer(a)
    else:
      bits[l.name] = (FULL_PRECISION, FULL_PRECISION)
  return policy_lib.from_masks_and_bits(arch, dataset, NAME, masks, bits, settings=settings,
                                        weight_masks=weight_masks, quantizers=quantizers)


def grids(policy: policy_lib.Policy) -> tuple:
  """Net's `opq_grids` from a policy: ((layer name, step, (s_c, ...)), ...) of its 'opq' layers."""
  return tuple((name, float(l.quantizer['step']), tuple(float(s) for s in l.quantizer['scales']))
               for name, l in policy.layers.items() if l.quantizer.get('name') == QUANTIZER)


def opq_model(arch: str, info, policy: policy_lib.Policy) -> models.Net:
  """The baseline's architecture with the 'opq' quantizer at the policy's frozen steps and scales."""
  return models.create_model(arch, info.num_classes, info.image_size, info.in_channels, quantizer=QUANTIZER,
                             opq_grids=grids(policy))


def masked_variables(variables: Mapping[str, Any], policy: policy_lib.Policy) -> dict:
  """The variables with every pruned weight set to exactly 0 (kernel * weight mask)."""
  params = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in variables['params'].items()}
  for name, mask in policy.weight_masks.items():
    params[name]['kernel'] = np.asarray(params[name]['kernel'], np.float32) * np.asarray(mask, np.float32)
  return {**variables, 'params': params}


def allocation_summary(allocation: Allocation) -> dict:
  """The method's own figures (JSON-able) for the report."""
  return {
      'sparsity_target': allocation.sparsity_target, 'sparsity': allocation.sparsity,
      'analytic_sparsity': allocation.analytic_sparsity, 'avg_bits_target': allocation.avg_bits_target,
      'avg_bits': allocation.avg_bits, 'threshold': allocation.threshold, 'global_step': allocation.global_step,
      'layers': {name: {'bits': a.bits, 'sparsity': a.sparsity, 'analytic_sparsity': a.analytic_sparsity,
                        'laplace_b': a.laplace_b, 'range': a.range, 'step': a.step, 'clamped': a.clamped}
                 for name, a in allocation.layers.items()},
  }


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------


def run(context: Context) -> Result:
  """Allocate from the baseline's weights (or reload the policy), and hand on the 'opq' model with the pruned
  weights of the baseline zeroed; fine-tuning is the shared loop."""
  config, workdir, topo = context.config, context.workdir, context.topology
  o = config.opq
  path = os.path.join(workdir, policy_lib.POLICY_FILE)
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  if os.path.exists(path) and os.path.exists(summary_path):
    policy = policy_lib.read_policy(path, config.model.arch)
    summary = checkpoints.read_json(summary_path)
  else:
    t0 = time.time()
    allocation = allocate(topo, context.baseline['params'], o.sparsity, o.avg_bits)
    settings = {'sparsity': o.sparsity, 'avg_bits': o.avg_bits, 'act_bits': o.act_bits}
    policy = to_policy(allocation, topo, config.model.arch, context.info.name, o.act_bits, settings)
    policy = policy_lib.replace_summary(policy, cost.ledger(topo, policy))
    summary = {**allocation_summary(allocation), 'wall_time_s': time.time() - t0}
    policy_lib.write_policy(workdir, policy)  # the policy first: a summary on disk means both are there
    checkpoints.write_json(summary_path, summary)
  model = opq_model(config.model.arch, context.info, policy)
  return Result(policy=policy, model=model, variables=masked_variables(context.baseline, policy),
                summary=summary)
