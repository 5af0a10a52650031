"""Compression methods, one module each behind one small interface, in a registry by name.

A method turns a trained dense baseline into a Policy (policy.py). Each method module defines:

    NAME     the registry name (`config.method.name`)
    SECTION  the config section whose settings apply to this method only (None if it has none)
    PROVENANCE  one line per choice: which come from the paper or its code, which are ours (the report shows it)
    check_config(config, topology) -> None
             settings it cannot run with: a ValueError of one sentence naming the key, before any work
    run(context: Context) -> Result
             its stages, each saved in context.workdir so that a stopped run resumes where it stopped

Everything after the method (fine-tuning with the policy frozen, cost, export, report, comparison) reads the
Result's Policy, model and variables, never the method.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping, Optional

# name -> module under picpq_jax.methods (imported on first use, so a method's dependencies load only when
# it runs).
REGISTRY = {
    'picpq': 'picpq',
    'uniform': 'uniform',
    'codeq': 'codeq',
    'opq': 'opq',
    'djpq': 'djpq',
}


@dataclasses.dataclass(frozen=True)
class Context:
  """What every method starts from.

  config: the run's ml_collections config; workdir: the run directory; model: the dense Net; topology: its
  prunable-layer table (topology.Topology, B_max applied); info: the dataset's data.DatasetInfo; baseline:
  the trained dense variables {'params', 'batch_stats'} (host arrays).
  """
  config: Any
  workdir: str
  model: Any
  topology: Any
  info: Any
  baseline: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Result:
  """What a method hands on.

  policy: the Policy. model: the Net that runs it (the dense model, or one with the method's quantizers).
  variables: the variables fine-tuning and evaluation start from (None: the baseline's). summary: the
  method's own figures for the report (JSON-able: e.g. the search's best loss, the training's wall time).
  """
  policy: Any
  model: Any
  variables: Optional[Mapping[str, Any]] = None
  summary: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(name: str):
  """The method module registered as `name`; ValueError naming config.method.name for an unknown one."""
  if name not in REGISTRY:
    raise ValueError(f'method.name={name!r} is not a registered method; choose one of {list(REGISTRY)}.')
  return importlib.import_module(f'{__name__}.{REGISTRY[name]}')


def sections() -> dict[str, str]:
  """config section -> the method it belongs to, for every registered method that has one."""
  out = {}
  for name in REGISTRY:
    section = getattr(get(name), 'SECTION', None)
    if section:
      out[section] = name
  return out
