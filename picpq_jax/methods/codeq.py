"""CoDeQ (BASELINES.md, "CoDeQ"): the dead zone of a scalar quantizer is the pruning, learned with the bits.

The method: build the baseline's network with CoDeQ's dead-zone quantizer in every prunable conv and the
classifier (`models.create_model(..., quantizer='codeq')`; the quantizer's math is quant.deadzone_*, re-exported
here), start from the baseline's weights with the logits at their init (3.0: almost no dead zone, max_bits),
train `config.codeq.epochs` epochs with AdamW in three parameter groups (weights, dead-zone logits, bit logits)
and plain cross-entropy, keep the best validation epoch, and read the Policy out of it:

    per prunable conv: channel mask all ones (CoDeQ prunes weights, not channels); weight mask W^ != 0;
    bits (B, act bits); quantizer {'name': 'codeq', 'step': s, 'shift': sh, 'bits': B, 'logit_dz', 'logit_bit',
    'max_bits', 'fixed_bits'}; each quantized head layer's {'name': 'codeq', 'bits', 'step', 'shift', ...} in
    the policy's `head`.

Resumable: training checkpoints every epoch under <workdir>/codeq (training.fit), the best under
<workdir>/codeq_best; the readout is policy.json (+ policy_weight_masks.npz) and codeq_readout.json (the
method's own figures), after which a rerun reuses it without training.

Settings: `config.codeq` (configs/common.py, `add_codeq_config`, whose docstring marks the paper's, the code's
and our choices).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from picpq_jax import checkpoints, cost, models, training
from picpq_jax import policy as policy_lib
from picpq_jax.methods import Context, Result
# The quantizer lives in quant.py (one module for every quantizer); re-exported for this method's users.
from picpq_jax.quant import (INIT_LOGIT, MIN_BITS, STEP_EPSILON, TOP_QUANTILE, DeadZoneGrid,  # noqa: F401
                             abs_quantile, clip_ste, deadzone_codes, deadzone_codes_at, deadzone_dequant,
                             deadzone_grid, deadzone_params, deadzone_quant, learned_bits, relu_ste, round_ste)

NAME = 'codeq'
SECTION = 'codeq'
STAGE = 'codeq'  # training.fit's stage: checkpoints under <workdir>/codeq and <workdir>/codeq_best
READOUT_FILE = 'codeq_readout.json'
FULL_PRECISION = 32
MAX_BITS = 16  # the largest max_bits accepted (codes are exported in int16 at most)

PROVENANCE = (
    '[paper] the dead zone of a scalar quantizer prunes; its width and the bit-width are learned per layer by '
    'backpropagation during ordinary training',
    '[code: src/quantizer.py] the quantizer exactly (A = 0.99 quantile of |W|, straight-through round, clip '
    'and relu, logits initialised at 3.0, min_bits 2, max_bits 8)',
    '[code: README] AdamW in three parameter groups (weights, dead-zone logits, bit logits), each with its own '
    'learning rate and weight decay',
    '[ours, strongly suggested by the code] the dead-zone logits\' weight decay is the sparsity knob, the bit '
    'logits\' the mixed-precision knob; the loss is plain cross-entropy',
    '[ours] learning rates, weight decays, epochs and schedule (the public code gives none)',
    '[ours] quantized layers: every prunable conv and every dense layer of the head, never BatchNorm',
    '[ours] end_bits (default 32): the stem conv and the classifier at full precision, PIC-PQ\'s convention '
    '(0 quantizes them like every other layer, as published)',
    '[code] activations not quantized (act_bits 32); [ours] act_bits < 32 uses PIC-PQ\'s activation quantizer',
    '[ours] starts from the shared dense baseline; the best validation epoch is kept',
)


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_config(config: ml_collections.ConfigDict, topology=None) -> None:
  """ValueError of one sentence naming the key for a setting CoDeQ cannot run with."""
  del topology  # CoDeQ runs on every architecture of the zoo
  cq = config.codeq
  if not _is_int(cq.epochs) or cq.epochs < 1:
    raise ValueError(f'codeq.epochs={cq.epochs!r} must be an integer >= 1 (the epochs of CoDeQ\'s training).')
  if not _is_int(cq.batch_size) or cq.batch_size < 1:
    raise ValueError(f'codeq.batch_size={cq.batch_size!r} must be a positive integer.')
  if cq.optimizer not in training.OPTIMIZERS:
    raise ValueError(f'codeq.optimizer={cq.optimizer!r} is not an optimizer; choose one of '
                     f'{list(training.OPTIMIZERS)} (CoDeQ trains with \'adamw\').')
  rates = [('codeq.learning_rate', cq.learning_rate, cq.weight_decay, 'codeq.weight_decay')]
  rates += [(f'codeq.groups.{name}.learning_rate', g.learning_rate, g.weight_decay,
             f'codeq.groups.{name}.weight_decay') for name, g in cq.groups.items()]
  for lr_key, lr, wd, wd_key in rates:
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
      raise ValueError(f'{lr_key}={lr!r} must be a finite number > 0.')
    if not _is_number(wd) or not math.isfinite(wd) or wd < 0:
      raise ValueError(f'{wd_key}={wd!r} must be a finite number >= 0.')
  if not _is_int(cq.max_bits) or not MIN_BITS <= cq.max_bits <= MAX_BITS:
    raise ValueError(f'codeq.max_bits={cq.max_bits!r} must be an integer in {MIN_BITS}..{MAX_BITS} (8 as '
                     'published).')
  if cq.fixed_bits is not None and (not _is_int(cq.fixed_bits) or not MIN_BITS <= cq.fixed_bits <= cq.max_bits):
    raise ValueError(f'codeq.fixed_bits={cq.fixed_bits!r} must be None (learned bits) or an integer in '
                     f'{MIN_BITS}..codeq.max_bits={cq.max_bits}.')
  if not _is_int(cq.act_bits) or not 2 <= cq.act_bits <= FULL_PRECISION:
    raise ValueError(f'codeq.act_bits={cq.act_bits!r} must be an integer in 2..32 (32: activations not '
                     'quantized, as published).')
  if not _is_int(cq.end_bits) or not (cq.end_bits == 0 or 2 <= cq.end_bits <= FULL_PRECISION):
    raise ValueError(f'codeq.end_bits={cq.end_bits!r} must be 0 (stem and classifier learned like every layer) '
                     'or an integer in 2..32 (fixed at that many bits; 32: not quantized).')


# ----------------------------------------------------------------------------------------------------------
# The model and its variables
# ----------------------------------------------------------------------------------------------------------


def codeq_model(config: ml_collections.ConfigDict, info) -> models.Net:
  """The baseline's architecture with CoDeQ's quantizer in every prunable conv and the head."""
  cq = config.codeq
  return models.create_model(config.model.arch, info.num_classes, info.image_size, info.in_channels,
                             quantizer='codeq', max_bits=int(cq.max_bits),
                             fixed_bits=None if cq.fixed_bits is None else int(cq.fixed_bits),
                             end_bits=int(cq.end_bits))


def initial_variables(model: models.Net, baseline: Mapping[str, Any], seed: int = 0) -> dict:
  """The codeq model's variables: every kernel, BatchNorm and dense variable from `baseline`, the logits at
  their init (INIT_LOGIT). ValueError if the baseline is not of this architecture."""
  spec = model.spec
  x = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_channels), jnp.float32)
  init = jax.device_get(model.init(jax.random.key(seed), x, train=False))
  out = {}
  for collection in ('params', 'batch_stats'):
    flat = traverse_util.flatten_dict(dict(init[collection]))
    base = traverse_util.flatten_dict(dict(baseline[collection]))
    for key, value in base.items():
      if key not in flat or np.shape(flat[key]) != np.shape(value):
        raise ValueError(f'the baseline\'s {collection} entry {"/".join(key)} (shape {np.shape(value)}) has no '
                         f'place in {spec.arch}\'s CoDeQ model; use the baseline of model.arch={spec.arch!r}.')
      flat[key] = np.asarray(value)
    out[collection] = traverse_util.unflatten_dict(flat)
  return out


def _is_end(conv) -> bool:
  return conv.source is None  # reads the image: the stem


def activation_bits(model: models.Net, act_bits: int) -> dict[str, tuple[int, int]]:
  """layer name -> (32, activation bits) the convs are trained and evaluated with (the weight part is unused
  by CoDeQ's units). The stem keeps 32 when end_bits is 32."""
  out = {}
  for c in model.spec.convs:
    a = FULL_PRECISION if (_is_end(c) and model.end_bits >= FULL_PRECISION) else int(act_bits)
    out[c.name] = (FULL_PRECISION, a)
  return out


def bits_argument(model: models.Net, act_bits: int) -> Optional[dict[str, np.ndarray]]:
  """The `bits` tree for Net.apply: None when no activation is quantized (CoDeQ as published)."""
  bits = activation_bits(model, act_bits)
  if all(a >= FULL_PRECISION for _, a in bits.values()):
    return None
  return {name: np.asarray(b, np.int32) for name, b in bits.items()}


# ----------------------------------------------------------------------------------------------------------
# Readout
# ----------------------------------------------------------------------------------------------------------


def layer_readout(kernel, logit_dz, logit_bit, max_bits: int, fixed_bits: Optional[int]) -> dict:
  """One tensor's figures: {'bits', 'step', 'shift', 'dead_zone', 'top', 'logit_dz', 'logit_bit'} (plain
  Python numbers), 'weight_mask' (W^ != 0, float32 0/1, the kernel's shape) and 'sparsity' (zero fraction)."""
  kernel = jnp.asarray(kernel, jnp.float32)
  p = jax.device_get(deadzone_params(kernel, logit_dz, logit_bit, max_bits=max_bits, fixed_bits=fixed_bits))
  w_hat = np.asarray(deadzone_quant(kernel, logit_dz, logit_bit, max_bits=max_bits, fixed_bits=fixed_bits))
  mask = (w_hat != 0).astype(np.float32)
  return {'bits': int(p['bits']), 'step': float(p['step']), 'shift': float(p['shift']),
          'dead_zone': float(p['dead_zone']), 'top': float(p['top']), 'logit_dz': float(logit_dz),
          'logit_bit': float(logit_bit), 'weight_mask': mask, 'sparsity': float(1.0 - mask.mean())}


def readout(model: models.Net, variables: Mapping[str, Any], arch: str, dataset: str, act_bits: int,
            settings: Optional[Mapping[str, Any]] = None) -> tuple[policy_lib.Policy, dict]:
  """(Policy, summary) of a trained codeq model's variables (see the module docstring).

  summary: 'conv_sparsity' (zero fraction over all quantized conv weights), 'layer_sparsity' and 'layer_bits'
  (per quantized conv), 'classifier' (per quantized head layer: bits, step, shift, sparsity).
  """
  params = variables['params']
  quantized = model.codeq_layers()
  a_bits = activation_bits(model, act_bits)
  masks, bits, weight_masks, quantizers = {}, {}, {}, {}
  layer_sparsity, layer_bits, zeros, total = {}, {}, 0.0, 0
  for c in model.spec.convs:
    masks[c.name] = np.ones(c.out_channels, np.float32)
    if c.name not in quantized:
      bits[c.name] = (FULL_PRECISION, a_bits[c.name][1])
      continue
    q = quantized[c.name]
    p = params[c.name]
    r = layer_readout(p['kernel'], p['logit_dz'], p['logit_bit'], q['max_bits'], q['fixed_bits'])
    weight_masks[c.name] = r.pop('weight_mask')
    bits[c.name] = (r['bits'], a_bits[c.name][1])
    sparsity = r.pop('sparsity')
    quantizers[c.name] = {'name': 'codeq', 'step': r['step'], 'shift': r['shift'], 'bits': r['bits'],
                          'logit_dz': r['logit_dz'], 'logit_bit': r['logit_bit'], 'max_bits': q['max_bits'],
                          'fixed_bits': q['fixed_bits']}
    layer_sparsity[c.name], layer_bits[c.name] = sparsity, r['bits']
    n = int(np.size(weight_masks[c.name]))
    zeros, total = zeros + sparsity * n, total + n
  classifier = {}
  for d in model.spec.head:
    if d.name in quantized:
      q = quantized[d.name]
      p = params[d.name]
      r = layer_readout(p['kernel'], p['logit_dz'], p['logit_bit'], q['max_bits'], q['fixed_bits'])
      r.pop('weight_mask')
      classifier[d.name] = {'name': 'codeq', **r, 'max_bits': q['max_bits'], 'fixed_bits': q['fixed_bits']}
  policy = policy_lib.from_masks_and_bits(arch, dataset, NAME, masks, bits, settings=settings,
                                          weight_masks=weight_masks, quantizers=quantizers, head=classifier)
  summary = {'conv_sparsity': zeros / total if total else 0.0, 'layer_sparsity': layer_sparsity,
             'layer_bits': layer_bits, 'classifier': classifier}
  return policy, summary


def _settings(cq: ml_collections.ConfigDict) -> dict:
  return {'epochs': cq.epochs, 'max_bits': cq.max_bits, 'fixed_bits': cq.fixed_bits, 'act_bits': cq.act_bits,
          'end_bits': cq.end_bits, 'optimizer': cq.optimizer,
          'groups': {name: {'learning_rate': g.learning_rate, 'weight_decay': g.weight_decay}
                     for name, g in cq.groups.items()}}


def _write_readout(workdir: str, policy: policy_lib.Policy, summary: Mapping[str, Any]) -> None:
  # The policy first: a summary on disk means the whole readout is there.
  policy_lib.write_policy(workdir, policy)
  checkpoints.write_json(os.path.join(workdir, READOUT_FILE), dict(summary))


def _read_readout(workdir: str, arch: str) -> tuple[policy_lib.Policy, dict]:
  policy = policy_lib.read_policy(os.path.join(workdir, policy_lib.POLICY_FILE), arch)
  return policy, checkpoints.read_json(os.path.join(workdir, READOUT_FILE))


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------


def run(context: Context) -> Result:
  """Train the codeq model from the baseline (resumable), read the Policy out of its best epoch."""
  config, workdir, info = context.config, context.workdir, context.info
  cq = config.codeq
  model = codeq_model(config, info)
  if os.path.exists(os.path.join(workdir, READOUT_FILE)):
    policy, summary = _read_readout(workdir, config.model.arch)
    variables = training.load_variables(workdir, STAGE, config, best=True)
    return Result(policy=policy, model=model, variables=variables, summary=summary)
  t0 = time.time()
  init = initial_variables(model, context.baseline, config.seed)
  result = training.fit(config, workdir, model, stage=STAGE, init_variables=init,
                        bits=bits_argument(model, cq.act_bits), train_cfg=cq, select_best=True)
  variables = training.load_variables(workdir, STAGE, config, best=True)
  policy, summary = readout(model, variables, config.model.arch, info.name, cq.act_bits, _settings(cq))
  policy = policy_lib.replace_summary(policy, cost.ledger(context.topology, policy))
  summary.update({'wall_time_s': time.time() - t0, 'best_epoch': result['best']['epoch'] + 1,
                  'best_val_accuracy': result['best']['accuracy']})
  _write_readout(workdir, policy, summary)
  return Result(policy=policy, model=model, variables=variables, summary=summary)
