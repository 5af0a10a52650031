"""The stages of a run, each resumable, driven by a config (DESIGN.md, "Shape").

Each stage writes its result into the workdir when it finishes (atomically); a finished stage is loaded
instead of recomputed, and an unfinished one resumes from its own checkpoints.
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections

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
