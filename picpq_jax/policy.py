"""The Policy: what a compression method decided, the one description everything after the method reads.

A Policy holds, per prunable conv (by layer name): the channel mask (which output channels stay), an optional
weight-level mask (which kernel entries stay, for unstructured methods such as CoDeQ and OPQ), the weight and
activation bits, and the quantizer that turns the kernel into its bits with that quantizer's parameters.
Layers a policy does not name are dense and full precision. Fine-tuning, cost, export, report and comparison
take a Policy and never ask which method made it (DESIGN.md, "Shape").

On disk (`write_policy` / `read_policy`, the only code that knows the format): `policy.json`, for people
and programs, and, when the policy has weight-level masks, `policy_weight_masks.npz` beside it. Format 2:

    {"format": 2, "arch": ..., "dataset": ..., "method": ..., "settings": {...the method's settings...},
     "layers": {name: {"mask": [0/1 per output channel] | null (all kept), "weight_bits": int, "act_bits": int,
                       "quantizer": {"name": "picpq" | "codeq" | ..., ...its parameters}}},
     "weight_masks": "policy_weight_masks.npz" | null, "summary": {...the cost ledger's figures...},
     "head": {dense layer name: {"name": ..., "bits": int, ...}} (empty: the head is full precision)}

Format 1 (PIC-PQ runs before the method interface: "masks" and "bits" by layer name, one bit-width for
weights and activations) is read and converted; anything else fails with one sentence.

    policy = read_policy(path)
    model.apply(variables, x, **model_arguments(policy))
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from picpq_jax import checkpoints

FORMAT = 2
POLICY_FILE = 'policy.json'
WEIGHT_MASKS_FILE = 'policy_weight_masks.npz'
FULL_PRECISION = 32
DEFAULT_QUANTIZER = 'picpq'  # quant.weight_codes / act_codes: PIC-PQ's quantizers
# A quantizer-dict key: True when fine-tuning must multiply the layer's weight mask into its quantized kernel
# (model_arguments then hands the mask on).
ENFORCE_WEIGHT_MASK = 'enforce_weight_mask'


class PolicyFormatError(ValueError):
  """A policy file that cannot be read: another format, another architecture, or damaged."""


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
  """One prunable conv's decisions.

  mask: (out_channels,) float32 0/1, the kept output channels (None: all). weight_mask: None, or a 0/1 array of
  the kernel's shape (HWIO) marking the kept entries. weight_bits / act_bits: 1..32 (32 = full precision).
  quantizer: {'name': ..., **parameters} (parameters are plain floats/ints, e.g. CoDeQ's step and shift).
  """
  mask: Optional[np.ndarray] = None
  weight_bits: int = FULL_PRECISION
  act_bits: int = FULL_PRECISION
  quantizer: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {'name': DEFAULT_QUANTIZER})
  weight_mask: Optional[np.ndarray] = None


@dataclasses.dataclass(frozen=True)
class Policy:
  """A compressed model's description: arch and dataset it belongs to, the method and settings that made it,
  and a LayerPolicy per prunable conv (forward order). `summary`: the cost ledger's figures, for people.
  `head`: dense layer name -> its quantizer {'name', 'bits', ...parameters} for a method that quantizes the
  classifier too (CoDeQ as published); empty: the head is full precision (PIC-PQ's convention)."""
  arch: str
  dataset: str
  method: str
  layers: Mapping[str, LayerPolicy]
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  summary: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  head: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def masks(self) -> dict[str, np.ndarray]:
    """layer name -> (out_channels,) float32 0/1, for the layers that prune channels."""
    return {name: layer.mask for name, layer in self.layers.items() if layer.mask is not None}

  @property
  def weight_bits(self) -> dict[str, int]:
    return {name: layer.weight_bits for name, layer in self.layers.items()}

  @property
  def act_bits(self) -> dict[str, int]:
    return {name: layer.act_bits for name, layer in self.layers.items()}

  @property
  def weight_masks(self) -> dict[str, np.ndarray]:
    """layer name -> kernel-shaped 0/1, only for the layers that have one."""
    return {name: layer.weight_mask for name, layer in self.layers.items() if layer.weight_mask is not None}

  @property
  def quantizers(self) -> dict[str, str]:
    """layer name -> quantizer name."""
    return {name: layer.quantizer['name'] for name, layer in self.layers.items()}

  @property
  def quantizer_parameters(self) -> dict[str, dict]:
    """layer name (convs and quantized head layers) -> {'name', ...parameters}: what the export stores."""
    convs = {name: dict(l.quantizer) for name, l in self.layers.items()}
    return {**convs, **{name: dict(q) for name, q in self.head.items()}}


def from_masks_and_bits(arch: str, dataset: str, method: str, masks: Mapping[str, Any],
                        bits: Mapping[str, Any], settings: Optional[Mapping[str, Any]] = None,
                        weight_masks: Optional[Mapping[str, Any]] = None,
                        quantizers: Optional[Mapping[str, Mapping[str, Any]]] = None,
                        head: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Policy:
  """A Policy from per-layer masks and bits (an int: the same for weights and activations; or a pair).

  Layers named in any of the dicts get a LayerPolicy; a layer missing from `masks` keeps every channel, and
  one missing from `bits` is full precision.
  """
  weight_masks, quantizers = weight_masks or {}, quantizers or {}
  names = list(dict.fromkeys([*masks, *bits, *weight_masks, *quantizers]))
  layers = {}
  for name in names:
    b = bits.get(name, FULL_PRECISION)
    w_bits, a_bits = (int(b), int(b)) if np.ndim(b) == 0 else (int(b[0]), int(b[1]))
    wm = weight_masks.get(name)
    mask = np.asarray(masks[name], np.float32) if name in masks else None
    layers[name] = LayerPolicy(mask=mask, weight_bits=w_bits, act_bits=a_bits,
                               quantizer=dict(quantizers.get(name, {'name': DEFAULT_QUANTIZER})),
                               weight_mask=None if wm is None else np.asarray(wm, np.float32))
  return Policy(arch=arch, dataset=dataset, method=method, layers=layers, settings=dict(settings or {}),
                head={name: dict(q) for name, q in (head or {}).items()})


def model_arguments(policy: Policy) -> dict[str, Any]:
  """What `Net.apply` (and training.fit) take for this policy: {'masks': name -> (C,) float32, 'bits':
  name -> (2,) int32 [weight, activation], or None when every layer is full precision}.

  Weight-level masks are among them only for the layers whose quantizer dict says
  `ENFORCE_WEIGHT_MASK: True` (OPQ-style: the masks are frozen and multiply the quantized kernel during
  fine-tuning): then the result also has 'weight_masks' (name -> kernel-shaped float32 0/1). Otherwise the
  method that made them keeps them in its weights (CoDeQ's dead zones give exact zeros) and the result is
  exactly {'masks', 'bits'}.
  """
  masks = {name: np.asarray(m, np.float32) for name, m in policy.masks.items()}
  quantized = any(l.weight_bits < FULL_PRECISION or l.act_bits < FULL_PRECISION for l in policy.layers.values())
  bits = ({name: np.asarray([l.weight_bits, l.act_bits], np.int32) for name, l in policy.layers.items()}
          if quantized else None)
  out = {'masks': masks, 'bits': bits}
  enforced = {name: np.asarray(l.weight_mask, np.float32) for name, l in policy.layers.items()
              if l.weight_mask is not None and l.quantizer.get(ENFORCE_WEIGHT_MASK)}
  if enforced:
    out['weight_masks'] = enforced
  return out


def replace_summary(policy: Policy, summary: Mapping[str, Any]) -> Policy:
  """The policy with `summary` (the cost ledger's figures) attached."""
  return dataclasses.replace(policy, summary=dict(summary))


def with_stage_bits(policy: Policy, weights: bool, activations: bool) -> Policy:
  """The policy with only the weight and/or activation bits applied (the other at 32): a fine-tuning stage."""
  layers = {name: dataclasses.replace(l, weight_bits=l.weight_bits if weights else FULL_PRECISION,
                                      act_bits=l.act_bits if activations else FULL_PRECISION)
            for name, l in policy.layers.items()}
  return dataclasses.replace(policy, layers=layers)


# ----------------------------------------------------------------------------------------------------------
# On disk
# ----------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def to_json(policy: Policy, weight_masks_file: Optional[str]) -> dict:
  layers = {}
  for name, l in policy.layers.items():
    layers[name] = {'mask': None if l.mask is None else np.asarray(l.mask).astype(int).tolist(),
                    'weight_bits': int(l.weight_bits),
                    'act_bits': int(l.act_bits), 'quantizer': {k: _plain(v) for k, v in l.quantizer.items()}}
  return {'format': FORMAT, 'arch': policy.arch, 'dataset': policy.dataset, 'method': policy.method,
          'settings': {k: _plain(v) for k, v in policy.settings.items()}, 'layers': layers,
          'weight_masks': weight_masks_file, 'summary': dict(policy.summary),
          'head': {name: {k: _plain(v) for k, v in q.items()} for name, q in policy.head.items()}}


def write_policy(workdir: str, policy: Policy) -> str:
  """policy.json (and policy_weight_masks.npz when there are weight masks) in workdir, each atomically;
  returns the JSON's path. The npz is written first, so a policy.json on disk always has its masks."""
  weight_masks = policy.weight_masks
  npz = None
  if weight_masks:
    npz = WEIGHT_MASKS_FILE
    # Stored as uint8: a mask is 0/1, and the file is 4x smaller than float32.
    checkpoints.write_npz(os.path.join(workdir, npz), {k: np.asarray(v, np.uint8) for k, v in weight_masks.items()})
  path = os.path.join(workdir, POLICY_FILE)
  checkpoints.write_json(path, to_json(policy, npz))
  return path


def _from_format1(obj: Mapping[str, Any]) -> Policy:
  """A PIC-PQ policy.json written before the method interface (masks, bits: one int per layer)."""
  settings = {'keep_fraction': obj['keep_fraction']} if 'keep_fraction' in obj else {}
  policy = from_masks_and_bits(obj['arch'], obj.get('dataset', ''), 'picpq', obj['masks'], obj['bits'], settings)
  return dataclasses.replace(policy, summary=obj.get('summary', {}))


def from_json(obj: Mapping[str, Any], weight_masks: Optional[Mapping[str, np.ndarray]] = None) -> Policy:
  layers = {}
  for name, l in obj['layers'].items():
    wm = None if weight_masks is None or name not in weight_masks else np.asarray(weight_masks[name], np.float32)
    mask = None if l['mask'] is None else np.asarray(l['mask'], np.float32)
    layers[name] = LayerPolicy(mask=mask, weight_bits=int(l['weight_bits']),
                               act_bits=int(l['act_bits']), quantizer=dict(l['quantizer']), weight_mask=wm)
  return Policy(arch=obj['arch'], dataset=obj['dataset'], method=obj['method'], layers=layers,
                settings=dict(obj.get('settings', {})), summary=dict(obj.get('summary', {})),
                head={name: dict(q) for name, q in obj.get('head', {}).items()})


def read_policy(path: str, arch: Optional[str] = None) -> Policy:
  """The Policy in `path` (a policy.json), checked to be of `arch` when given.

  Raises PolicyFormatError (one sentence naming the file) for a file of another format or architecture, a
  damaged file, or a missing weight-mask file; FileNotFoundError when `path` does not exist.
  """
  obj = checkpoints.read_json(path)
  try:
    if not isinstance(obj, dict):
      raise KeyError('not an object')
    fmt = obj.get('format', 1 if 'masks' in obj and 'bits' in obj else None)
    if fmt == 1:
      policy = _from_format1(obj)
    elif fmt == FORMAT:
      weight_masks = None
      if obj.get('weight_masks'):
        npz = os.path.join(os.path.dirname(path), obj['weight_masks'])
        if not os.path.exists(npz):
          raise PolicyFormatError(f'{path} refers to weight masks in {npz}, which does not exist; rerun the '
                                  'method stage in a fresh --workdir.')
        weight_masks = checkpoints.read_npz(npz)
      policy = from_json(obj, weight_masks)
    else:
      raise PolicyFormatError(f'{path} is a policy of format {fmt!r}, which this version cannot read (it reads '
                              f'formats 1 and {FORMAT}); rerun the method in a fresh --workdir.')
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, PolicyFormatError):
      raise
    raise PolicyFormatError(f'{path} is not a readable policy ({type(e).__name__}: {e}); rerun the method in a '
                            'fresh --workdir.') from None
  if arch is not None and policy.arch != arch:
    raise PolicyFormatError(f'{path} is a policy for {policy.arch} but model.arch={arch!r}; use the config the '
                            'policy was made with, or a fresh --workdir.')
  return policy
