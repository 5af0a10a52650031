"""Export: the physically slimmed network (pruned channels removed from every tensor).

`slim_spec` rewrites an architecture spec to the kept channel counts, and `slice_variables` cuts the
masked model's variables down to the kept channels, so `Net(slim_spec(...))` computes without masks what the
masked model computes. Chains need no special care: members share one mask, so the channels they keep
coincide, and option-A shortcuts still append zeros at the end (the kept channels of a narrower stage are
the first kept channels of the wider one).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from picpq_jax.models.spec import ArchSpec


def kept_indices(spec: ArchSpec, masks: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
  """layer name -> sorted indices of the kept output channels (all channels of an unmasked layer)."""
  masks = masks or {}
  return {c.name: (np.flatnonzero(np.asarray(masks[c.name]) > 0.5) if c.name in masks
                   else np.arange(c.out_channels)) for c in spec.convs}


def _input_indices(spec: ArchSpec, keep: Mapping[str, np.ndarray], source) -> np.ndarray | None:
  return None if source is None else keep[source]


def slim_spec(spec: ArchSpec, keep: Mapping[str, np.ndarray]) -> ArchSpec:
  """The spec of the slimmed network: every conv's channels (and a depthwise conv's groups) cut to `keep`."""
  convs = []
  for c in spec.convs:
    out = len(keep[c.name])
    inp = spec.in_channels if c.source is None else len(keep[c.source])
    groups = out if c.depthwise else c.groups
    convs.append(dataclasses.replace(c, in_channels=inp, out_channels=out, groups=groups))
  head = list(spec.head)
  head[0] = dataclasses.replace(head[0], in_features=len(keep[head[0].source]))
  return dataclasses.replace(spec, convs=tuple(convs), head=tuple(head))


def slice_variables(spec: ArchSpec, variables: Mapping[str, Any], keep: Mapping[str, np.ndarray]) -> dict:
  """Cut `variables` ({'params', 'batch_stats'}) of the masked model down to the kept channels."""
  params = {k: v for k, v in variables['params'].items()}
  stats = {k: v for k, v in variables.get('batch_stats', {}).items()}
  for c in spec.convs:
    out = keep[c.name]
    kernel = np.asarray(params[c.name]['kernel'])[..., out]
    inp = _input_indices(spec, keep, c.source)
    if inp is not None and not c.depthwise:
      kernel = kernel[:, :, inp, :]
    bn = {k: np.asarray(v)[out] for k, v in params[c.name]['bn'].items()}
    params[c.name] = {'kernel': kernel, 'bn': bn}
    if c.name in stats:
      stats[c.name] = {'bn': {k: np.asarray(v)[out] for k, v in stats[c.name]['bn'].items()}}
  first = spec.head[0]
  dense = dict(params[first.name])
  dense['kernel'] = np.asarray(dense['kernel'])[keep[first.source], :]
  params[first.name] = dense
  out = {'params': params}
  if stats:
    out['batch_stats'] = stats
  return out
