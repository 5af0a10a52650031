"""The stages of a run, each resumable, driven by a config (DESIGN.md, "Shape").

Each stage writes its result into the workdir when it finishes (atomically); a finished stage is loaded
instead of recomputed, and an unfinished one resumes from its own checkpoints.
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from picpq_jax import data, metrics, models, training

BASELINE = 'baseline'


def build_model(config: ml_collections.ConfigDict):
  info = data.dataset_info(config.data)
  return models.create_model(config.model.arch, info.num_classes, info.image_size, info.in_channels), info


def evaluate_split(config, model, variables, split: str, masks=None, bits=None) -> dict:
  eval_step = jax.jit(training.make_eval_step(model))
  batches = data.epoch_batches(config.data, split, config.train.eval_batch_size, train=False)
  return training.evaluate(eval_step, variables, batches, training.data_mesh(), masks, bits)


def train_baseline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage 1: train (or resume training) the dense baseline; evaluate it on validation and test once.

  Writes <workdir>/baseline.json; returns it. The weights are in <workdir>/baseline (orbax).
  """
  path = os.path.join(workdir, BASELINE + '.json')
  if os.path.exists(path):
    summary = metrics.read_json(path)
    if summary.get('arch') != config.model.arch:
      raise ValueError(f'{workdir} holds a {summary.get("arch")} baseline but model.arch='
                       f'{config.model.arch!r}; use the matching config or a fresh --workdir.')
    return summary
  os.makedirs(workdir, exist_ok=True)
  model, _ = build_model(config)
  t0 = time.time()
  result = training.fit(config, workdir, model, stage=BASELINE)
  variables = result['state'].variables
  summary = {
      'arch': config.model.arch, 'dataset': config.data.name, 'epochs': config.train.epochs,
      'validation': evaluate_split(config, model, variables, 'validation'),
      'test': evaluate_split(config, model, variables, 'test'),
      'wall_time_s': time.time() - t0,
  }
  metrics.write_json(path, summary)
  return summary


def load_baseline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return training.load_variables(workdir, BASELINE, config)


# ----------------------------------------------------------------------------------------------------------
# Compression stages
# ----------------------------------------------------------------------------------------------------------

FILTER_PROPERTIES = 'filter_properties.npz'
SEARCH = 'search'
POLICY = 'policy.json'


def check_search_config(config: ml_collections.ConfigDict, topo) -> None:
  """Settings the search cannot run with, reported before any work starts."""
  from picpq_jax import criteria, evolution, fitness, pruning  # pylint: disable=g-import-not-at-top
  s = config.search
  if s.criterion not in criteria.KINDS:
    raise ValueError(f'search.criterion={s.criterion!r} is not a filter property; choose one of '
                     f'{list(criteria.KINDS)}.')
  if s.tau < 0:
    raise ValueError(f'search.tau={s.tau} must be >= 0 (SGD steps of the fine-tune inside the fitness).')
  fitness.resolve_eval_mode(s.eval_mode)
  evolution.make_strategy(s.strategy, topo.num_layers, s.population, s.num_children, s.total_evaluations,
                          tournament_size=s.tournament)
  # The identity candidate (a = 1, b = 0) with all-zero properties: if even it cannot reach the target under
  # the safeguard, global_prune says so in one sentence.
  zeros = [np.zeros(l.out_channels, np.float32) for l in topo.layers]
  pruning.global_prune(topo, zeros, np.ones(topo.num_layers), np.zeros(topo.num_layers), s.keep_fraction,
                       s.safeguard, s.check_every)
  if s.val_batch_size > config.data.val_size:
    raise ValueError(f'search.val_batch_size={s.val_batch_size} exceeds data.val_size={config.data.val_size}; '
                     'the fitness needs at least one full validation batch.')


def compute_filter_properties(config, workdir: str, model, topo, variables) -> dict:
  """Stage 2: per-layer FP vectors (saved to <workdir>/filter_properties.npz)."""
  from picpq_jax import criteria  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, FILTER_PROPERTIES)
  if os.path.exists(path):
    with np.load(path) as f:
      return {name: f[name] for name in topo.names}
  s = config.search
  batches = None
  if s.criterion == 'rank':
    # Eval-mode statistics on plain (unaugmented) training images, as the original's calibration.
    batches = data.fixed_batches(config.data, 'train', s.calibration_batch_size, s.calibration_batches,
                                 seed=config.seed, train=False)['image']
  fp = criteria.filter_properties(model, variables, batches, s.criterion)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **fp)
  os.replace(tmp, path)
  return fp
