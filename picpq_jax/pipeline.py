"""The stages of a run, each resumable, driven by a config (DESIGN.md, "Shape"); orchestration only.

    check_config -> dense baseline -> the method (config.method.name: methods/) -> Policy
                 -> fine-tuning with the policy frozen (or evaluation of the method's own trained model)
                 -> export -> report

Each stage writes its result into the workdir when it finishes (atomically); a finished stage is loaded
instead of recomputed, and an unfinished one resumes from its own checkpoints. Nothing here depends on which
method made the policy.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from picpq_jax import calibration, checkpoints, cost, data, fingerprints, methods, models, training, xla_setup
from picpq_jax import policy as policy_lib

BASELINE = 'baseline'


def build_model(config: ml_collections.ConfigDict):
  info = data.dataset_info(config.data)
  return models.create_model(config.model.arch, info.num_classes, info.image_size, info.in_channels), info


def build_topology(config: ml_collections.ConfigDict, info: Optional[data.DatasetInfo] = None):
  """The prunable-layer table of the config's model on its data (`info`: the dataset's, when the caller has
  it), with config.search.b_max, when given, as the layers' B_max (topology.get_topology applies it)."""
  from picpq_jax import topology  # pylint: disable=g-import-not-at-top
  info = info or data.dataset_info(config.data)
  return topology.get_topology(config.model.arch, info.num_classes, info.image_size, info.in_channels,
                               b_max=config.search.b_max)


def evaluate_split(config, model, variables, split: str, masks=None, bits=None) -> dict:
  eval_step = jax.jit(training.make_eval_step(model))
  batches = data.epoch_batches(config.data, split, config.train.eval_batch_size, train=False)
  return training.evaluate(eval_step, variables, batches, training.data_mesh(), masks, bits)


def train_baseline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage 1: train (or resume training) the dense baseline; evaluate it on validation and test once.

  Writes <workdir>/baseline.json; returns it. The weights are in <workdir>/baseline (orbax).
  """
  fingerprints.enter(workdir, config, 'baseline')
  path = os.path.join(workdir, BASELINE + '.json')
  if os.path.exists(path):
    summary = checkpoints.read_json(path)
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
  checkpoints.write_json(path, summary)
  return summary


def load_baseline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return load_stage_variables(config, workdir, BASELINE, 'baseline')


def load_stage_variables(config, workdir: str, checkpoint: str, stage: str, best: bool = False) -> dict:
  """training.load_variables of a finished stage's checkpoint; a damaged one is one sentence naming it and
  the --config.recompute that computes it again."""
  try:
    return training.load_variables(workdir, checkpoint, config, best=best)
  except checkpoints.CheckpointDamagedError as e:
    name = fingerprints.label(config, stage)
    raise checkpoints.CheckpointDamagedError(
        f'the checkpoint {e.path} of the finished {name} stage is damaged ({e.reason}); add '
        f'--config.recompute={name} to compute {name} and every later stage again, or use a fresh --workdir.',
        e.path, e.reason) from None


# ----------------------------------------------------------------------------------------------------------
# Checks, all before any work
# ----------------------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every setting a run cannot work with, each a ValueError of one sentence naming the key, before any work:
  the general ones (cli.check_config), then the chosen method's (methods.<name>.check_config)."""
  from picpq_jax import cli  # pylint: disable=g-import-not-at-top
  cli.check_config(config)
  info = data.dataset_info(config.data)
  cli.check_batch_sizes(config, info)
  method = methods.get(config.method.name)
  method.check_config(config, build_topology(config, info))


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------


def run_method(config: ml_collections.ConfigDict, workdir: str) -> methods.Result:
  """The chosen method from the dense baseline in workdir (resumable; a finished method is reloaded)."""
  fingerprints.enter(workdir, config, 'method')
  model, info = build_model(config)
  context = methods.Context(config=config, workdir=workdir, model=model, topology=build_topology(config, info),
                            info=info, baseline=load_baseline(config, workdir))
  return methods.get(config.method.name).run(context)


def compress(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole run: baseline -> method -> policy -> fine-tuning (or evaluation) -> export -> report."""
  from picpq_jax import report  # pylint: disable=g-import-not-at-top
  check_config(config)
  fingerprints.prepare(workdir, config)
  baseline = train_baseline(config, workdir)
  xla_setup.release_freed_memory()  # what the finished stage freed goes back to the system
  result = run_method(config, workdir)
  xla_setup.release_freed_memory()
  topo = build_topology(config)
  tuned = (finetune(config, workdir, topo, result) if config.finetune.enabled
           else evaluate_method(config, workdir, result))
  exported = export_run(config, workdir, result, tuned)
  summary = run_summary(config, workdir, baseline, result, tuned, exported)
  write_report(config, workdir, summary)
  return {'baseline': baseline, 'method': result.summary, 'policy': result.policy, 'finetune': tuned,
          'table': report.policy_table(summary), 'summary': summary}


REPORT_FILES = ('summary.json', 'summary.md', 'layers.png')  # report.write_run_report's


def write_report(config, workdir: str, summary: dict) -> None:
  """The report stage: summary.json, summary.md and layers.png, written once (a finished run run again writes
  nothing)."""
  from picpq_jax import report  # pylint: disable=g-import-not-at-top
  fingerprints.enter(workdir, config, 'report')
  if not all(os.path.exists(os.path.join(workdir, name)) for name in REPORT_FILES):
    report.write_run_report(workdir, summary)


def run_summary(config, workdir: str, baseline: dict, result: methods.Result, tuned: Optional[dict],
                exported: Optional[dict]) -> dict:
  """The numbers of one run (what the field reports), gathered for report.write_run_report."""
  policy = result.policy
  method = methods.get(policy.method)
  out = {
      'arch': policy.arch, 'dataset': policy.dataset, 'method': policy.method, 'settings': dict(policy.settings),
      'provenance': list(getattr(method, 'PROVENANCE', ())), 'workdir': os.path.abspath(workdir),
      'baseline_test_accuracy': baseline['test']['accuracy'],
      'compressed_test_accuracy': tuned['test']['accuracy'] if tuned else None,
      'compressed_validation_accuracy': tuned['validation']['accuracy'] if tuned else None,
      **cost.ledger(build_topology(config), policy),
      'method_summary': dict(result.summary),
      'wall_time_s': {'baseline': baseline.get('wall_time_s'), 'method': result.summary.get('wall_time_s'),
                      **({k: v['wall_time_s'] for k, v in tuned.get('stages', {}).items()} if tuned else {})},
      'export': exported,
  }
  if tuned:
    out['accuracy_drop'] = out['baseline_test_accuracy'] - out['compressed_test_accuracy']
  return out


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning with the policy frozen
# ----------------------------------------------------------------------------------------------------------

# (stage name, epochs key in config.finetune, which of the layer's bits apply: weights, activations)
FINETUNE_STAGES = (('finetune_fp', 'fp_epochs', False, False),
                   ('finetune_act', 'act_epochs', False, True),
                   ('finetune_weight_act', 'weight_act_epochs', True, True))
FINETUNE = 'finetune.json'


def stage_train_config(config, epochs: int) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config.finetune.to_dict())
  cfg.epochs = epochs
  return cfg


def start_variables(config, workdir: str, topo, result: methods.Result) -> dict:
  """What fine-tuning starts from: the method's variables (or the baseline's) with pruned channels zeroed."""
  from picpq_jax import pruning  # pylint: disable=g-import-not-at-top
  variables = result.variables or load_baseline(config, workdir)
  return {**variables, 'params': pruning.zero_pruned_weights(topo, variables['params'], result.policy.masks)}


def finetune(config: ml_collections.ConfigDict, workdir: str, topo, result: methods.Result) -> dict:
  """Fine-tune the policy: with masks, then activations quantized, then weights and activations.

  Each stage starts from the best validation checkpoint of the previous one (the method's variables for the
  first), is resumable, and keeps the pruned weights at exactly 0. Writes <workdir>/finetune.json (per stage:
  validation accuracy, best epoch, wall time; final test accuracy, measured once).
  """
  fingerprints.enter(workdir, config, 'finetune')
  path = os.path.join(workdir, FINETUNE)
  if os.path.exists(path):
    return checkpoints.read_json(path)
  model, policy = result.model, result.policy
  masks = policy_lib.model_arguments(policy)['masks']
  baseline = load_baseline(config, workdir)
  variables = start_variables(config, workdir, topo, result)
  stages, activation_scale = {}, None
  for name, epochs_key, on_weights, on_acts in FINETUNE_STAGES:
    epochs = config.finetune[epochs_key]
    if epochs <= 0:
      continue
    if on_acts and config.finetune.calibrate_activations and activation_scale is None:
      # Entering quantization-aware training: move the activations into the quantizer's [0, 1] first.
      images = data.fixed_batches(config.data, 'train', config.finetune.batch_size, 2, seed=config.seed,
                                  train=False)['image']
      variables, activation_scale = calibration.fit_to_quantizer_range(
          model, variables, images.reshape(-1, *images.shape[2:]), masks, config.finetune.calibration_percentile)
    stage_policy = policy_lib.with_stage_bits(policy, on_weights, on_acts)
    fitted = training.fit(with_finetune_seed(config), workdir, model, stage=name, init_variables=variables,
                          train_cfg=stage_train_config(config, epochs), select_best=True, teacher=baseline,
                          **policy_lib.model_arguments(stage_policy))
    variables = load_stage_variables(config, workdir, name, 'finetune', best=True)
    xla_setup.release_freed_memory()
    stages[name] = {'epochs': epochs, 'best_val_accuracy': fitted['best']['accuracy'],
                    'best_epoch': fitted['best']['epoch'] + 1, 'wall_time_s': fitted['wall_time_s']}
  summary = {'stages': stages, 'activation_scale': activation_scale,
             **evaluate_policy(config, model, variables, policy)}
  checkpoints.write_json(path, summary)
  return summary


def with_finetune_seed(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config whose `seed` the fine-tuning stages train with: finetune.seed where set (compare.py repeats
  the fine-tuning of one policy with several), else the run's own."""
  seed = config.finetune.get('seed')
  if seed is None or seed == config.seed:
    return config
  out = config.copy_and_resolve_references()
  out.seed = seed
  return out


def evaluate_policy(config, model, variables, policy: policy_lib.Policy) -> dict:
  """{'validation': ..., 'test': ...} loss and accuracy of `variables` run under the whole policy."""
  args = policy_lib.model_arguments(policy)
  return {split: evaluate_split(config, model, variables, split, args['masks'], args['bits'])
          for split in ('validation', 'test')}


EVALUATION = 'evaluation.json'


def evaluate_method(config, workdir: str, result: methods.Result) -> Optional[dict]:
  """Without fine-tuning: the method's own trained model under its policy (CoDeQ's training is its QAT);
  None for a method that trains nothing (its policy has not been fine-tuned, so it has no accuracy yet)."""
  fingerprints.enter(workdir, config, 'finetune')
  if result.variables is None:
    return None
  path = os.path.join(workdir, EVALUATION)
  if os.path.exists(path):
    return checkpoints.read_json(path)
  summary = evaluate_policy(config, result.model, result.variables, result.policy)
  checkpoints.write_json(path, summary)
  return summary


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------

EXPORT = 'model_export.npz'
EXPORT_REPORT = 'export.json'


def final_variables(config, workdir: str, result: methods.Result) -> Optional[dict]:
  """The compressed model's variables: the best of the last fine-tuning stage that ran (one with epochs in
  the config and a best checkpoint), else the method's own."""
  for name, epochs_key, _, _ in reversed(FINETUNE_STAGES):
    directory = os.path.join(workdir, name + '_best')
    if config.finetune[epochs_key] > 0 and os.path.isdir(directory) and os.listdir(directory):
      return load_stage_variables(config, workdir, name, 'finetune', best=True)
  return result.variables


def export_run(config: ml_collections.ConfigDict, workdir: str, result: methods.Result,
               tuned: Optional[dict]) -> Optional[dict]:
  """The compressed model as a slimmed, integer-coded file (<workdir>/model_export.npz); None when there is
  no compressed model yet (no fine-tuning and a method that trains nothing).

  BatchNorm folded or kept as config.export.fold_bn says. Returns the size report (dense FP32 bytes, file
  bytes, ratio) and, on config.export.check_images test images, the largest |logit difference| between the
  loaded export and the masked fake-quantized model. Saved in export.json and reused.
  """
  from picpq_jax import export  # pylint: disable=g-import-not-at-top
  fingerprints.enter(workdir, config, 'export')
  report_path = os.path.join(workdir, EXPORT_REPORT)
  if tuned is None:
    return None
  if os.path.exists(report_path) and os.path.exists(os.path.join(workdir, EXPORT)):
    return checkpoints.read_json(report_path)
  variables = final_variables(config, workdir, result)
  policy = result.policy
  args = policy_lib.model_arguments(policy)
  info = data.dataset_info(config.data)
  spec = models.get_spec(config.model.arch, info.num_classes, info.image_size, info.in_channels)
  path = os.path.join(workdir, EXPORT)
  bits = {name: (l.weight_bits, l.act_bits) for name, l in policy.layers.items()}
  summary = export.export_model(path, spec, variables, args['masks'], bits, fold_bn=config.export.fold_bn,
                                meta={'dataset': config.data.name, 'method': policy.method},
                                quantizers=policy.quantizer_parameters)
  n = config.export.check_images
  if n > 0:
    n = min(n, info.num_test)
    images = data.fixed_batches(config.data, 'test', n, 1, seed=config.seed, train=False)['image'][0]
    diff = export.logit_difference(path, spec, variables, args['masks'], bits, images, model=result.model)
    summary = {**summary, 'checked_images': n, 'max_logit_difference': float(diff.max())}
  checkpoints.write_json(report_path, summary)
  return summary


def finetune_policy(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """train.py --finetune: the fine-tuning stages and the export for the policy a method left in workdir."""
  check_config(config)
  path = os.path.join(workdir, policy_lib.POLICY_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} has no {policy_lib.POLICY_FILE}: the method there is incomplete or never '
                            f'ran; run search.py --workdir {workdir} with the same config first.')
  policy_lib.read_policy(path, config.model.arch)  # one sentence for a policy of another architecture
  if not os.path.exists(os.path.join(workdir, BASELINE + '.json')):
    raise FileNotFoundError(f'{workdir} has a policy but no baseline; it is not a complete run directory.')
  fingerprints.prepare(workdir, config, last='export')
  result = run_method(config, workdir)
  tuned = finetune(config, workdir, build_topology(config), result)
  return {'finetune': tuned, 'export': export_run(config, workdir, result, tuned)}
