"""The stages of a run, each resumable, driven by a config (DESIGN.md, "Shape").

Each stage writes its result into the workdir when it finishes (atomically); a finished stage is loaded
instead of recomputed, and an unfinished one resumes from its own checkpoints.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from picpq_jax import calibration, data, metrics, models, training

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
  from picpq_jax import criteria, evolution, fitness, pruning, topology  # pylint: disable=g-import-not-at-top
  s = config.search
  model = f'{topo.arch} ({topo.num_layers} prunable convs)'
  if isinstance(s.keep_fraction, bool) or not 0 < s.keep_fraction <= 1:
    raise ValueError(f'search.keep_fraction={s.keep_fraction!r} must lie in (0, 1]: it is the fraction of the '
                     f'dense FLOPs of {model} that the pruned model keeps, e.g. 0.45.')
  if isinstance(s.tau, bool) or not isinstance(s.tau, (int, np.integer)) or s.tau < 0:
    raise ValueError(f'search.tau={s.tau!r} must be a non-negative integer: it counts the SGD steps that fine-tune '
                     f'each pruned candidate of {model} before its fitness is measured (0 skips them; the '
                     'original uses 200).')
  topology.check_b_max(s.b_max, topo)
  if s.criterion not in criteria.PROPERTIES:
    raise ValueError(f'search.criterion={s.criterion!r} is not a filter property; choose one of '
                     f'{list(criteria.PROPERTIES)}.')
  fitness.resolve_eval_mode(s.eval_mode)
  strategy, _ = evolution.make_strategy(s.strategy, topo.num_layers, s.population, s.num_children,
                                        s.total_evaluations, tournament_size=s.tournament)
  if isinstance(strategy, evolution.AgingEvolution) and s.population < s.tournament:
    # Draws with replacement would still work, but a tournament larger than the population is a typo.
    raise ValueError(f'search.population ({s.population}) is smaller than search.tournament ({s.tournament}); '
                     'the tournament draws from the population: lower search.tournament or raise '
                     'search.population.')
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


def search_batches(config, info) -> tuple[dict, dict]:
  """The fitness's data: tau augmented training batches (the same for every candidate) and the
  validation batches."""
  s = config.search
  shape = (info.image_size, info.image_size, info.in_channels)
  if s.tau > 0:
    train = data.fixed_batches(config.data, 'train', s.batch_size, s.tau, seed=config.seed, train=True)
  else:
    train = {'image': np.zeros((0, s.batch_size, *shape), np.float32),
             'label': np.zeros((0, s.batch_size), np.int32)}
  num_val = config.data.val_size // s.val_batch_size
  val = data.fixed_batches(config.data, 'validation', s.val_batch_size, num_val, seed=config.seed, train=False)
  return train, val


def run_search(config, workdir: str, model, topo, variables, fp) -> dict:
  """Stage 3: the evolutionary search over (a, b); checkpointed every round under <workdir>/search.

  Writes <workdir>/search.json (best candidate, decoded) and search_history.npz (every candidate's a, b,
  loss, FLOPs), and the plot search_loss.png. Returns the search.json content.
  """
  from picpq_jax import criteria, evolution, fitness, pruning, report  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'search.json')
  if os.path.exists(path):
    return metrics.read_json(path)
  s = config.search
  info = data.dataset_info(config.data)
  fp_padded = pruning.pad_filter_properties(topo, fp)
  std = criteria.fp_std(fp, topo.names)
  train, val = search_batches(config, info)
  fns = fitness.CandidateFns(model, topo, fp_padded, s)
  evaluate = fitness.PopulationFitness(fns, variables, train, val, s.chunk_size, s.eval_mode)
  prune = jax.jit(lambda a, b: pruning.prune_masks_batched(topo, fp_padded, a, b, s.keep_fraction, s.safeguard,
                                                           s.check_every))
  plans = lambda a, b: fitness.plan_keys(topo, jax.device_get(prune(a, b)[0]))  # noqa: E731
  losses = lambda a, b: evaluate(a, b)['loss']  # noqa: E731
  if s.cache_plans:
    losses = fitness.PlanCache(losses, plans)

  def decoded(x):
    return tuple(np.asarray(v) for v in evolution.decode(x, std))

  strategy, params = evolution.make_strategy(s.strategy, topo.num_layers, s.population, s.num_children,
                                             s.total_evaluations, tournament_size=s.tournament)
  t0 = time.time()
  result = evolution.run_search(
      strategy, params, lambda x: losses(*decoded(x)), jax.random.key(config.seed), topo.num_layers,
      s.total_evaluations, progress=True, checkpoint_dir=os.path.join(workdir, SEARCH),
      initial_slice=evaluate.group,
      on_restore=(lambda x, loss: losses.remember(*decoded(x), loss)) if s.cache_plans else None)
  wall = time.time() - t0
  a_hist, b_hist = decoded(result.history_population)
  hist_masks, hist_info = jax.device_get(prune(a_hist, b_hist))
  # Which evaluations repeated an earlier plan: with search.cache_plans these took the stored loss.
  repeated = fitness.repeated_plans(fitness.plan_keys(topo, hist_masks))
  loss = np.asarray(result.history_fitness)
  tmp = os.path.join(workdir, 'search_history.tmp.npz')
  np.savez(tmp, a=a_hist, b=b_hist, loss=loss, flops=np.asarray(hist_info['flops']),
           reached=np.asarray(hist_info['reached']), repeated_plan=repeated)
  os.replace(tmp, os.path.join(workdir, 'search_history.npz'))
  saved = int(repeated.sum()) if s.cache_plans else 0
  report.plot_search(loss, os.path.join(workdir, 'search_loss.png'),
                     f'{config.model.arch} on {config.data.name}: {s.strategy}', repeated=repeated)
  best_a, best_b = (np.asarray(v).tolist() for v in evolution.decode(result.best_solution, std))
  summary = {'arch': config.model.arch, 'strategy': s.strategy, 'evaluations': int(len(loss)),
             'distinct_plans': int(len(loss) - repeated.sum()), 'evaluations_saved': saved,
             'best_loss': float(result.best_fitness), 'a': best_a, 'b': best_b,
             'failed_candidates': int(np.sum(~np.isfinite(loss))), 'wall_time_s': wall,
             'candidates_per_s': len(loss) / max(wall, 1e-9)}
  metrics.write_json(path, summary)
  return summary


def derive_policy(config, workdir: str, topo, variables, fp, found: dict) -> dict:
  """Stages 4-5: masks of the best (a, b) by global ranking, then bits from the surviving magnitude.

  Writes <workdir>/policy.json (layer name -> kept channel indices and bits, for people and programs).
  """
  from picpq_jax import bits as bits_lib, pruning, report  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, POLICY)
  if os.path.exists(path):
    return metrics.read_json(path)
  s = config.search
  masks, info = pruning.global_prune(topo, fp, np.asarray(found['a']), np.asarray(found['b']),
                                     s.keep_fraction, s.safeguard, s.check_every)
  masks = {k: np.asarray(v) for k, v in masks.items()}
  bits = bits_lib.assign_bits(topo, variables['params'], masks, None, s.bit_penalty, s.min_bits)
  policy = {
      'arch': config.model.arch, 'dataset': config.data.name, 'keep_fraction': s.keep_fraction,
      'masks': {k: v.astype(int).tolist() for k, v in masks.items()},
      'bits': bits,
      'summary': report.compression_summary(topo, masks, bits),
  }
  metrics.write_json(path, policy)
  return policy


def policy_arrays(policy: dict) -> tuple[dict, dict]:
  """(masks, bits) of a policy.json as the model's arguments (float masks; int bits per layer)."""
  masks = {k: np.asarray(v, np.float32) for k, v in policy['masks'].items()}
  return masks, {k: int(v) for k, v in policy['bits'].items()}


def compress(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole pipeline: baseline -> filter properties -> search -> masks + bits (-> fine-tuning)."""
  from picpq_jax import report  # pylint: disable=g-import-not-at-top
  model, info = build_model(config)
  topo = build_topology(config, info)
  check_search_config(config, topo)
  baseline = train_baseline(config, workdir)
  variables = load_baseline(config, workdir)
  fp = compute_filter_properties(config, workdir, model, topo, variables)
  found = run_search(config, workdir, model, topo, variables, fp)
  policy = derive_policy(config, workdir, topo, variables, fp, found)
  masks, bits = policy_arrays(policy)
  table = report.policy_table(topo, masks, bits)
  tuned = finetune(config, workdir, model, topo, policy) if config.finetune.enabled else None
  exported = export_run(config, workdir) if tuned else None
  summary = report.run_summary(workdir, topo, baseline, policy, found, tuned, exported)
  report.write_run_report(workdir, summary)
  return {'baseline': baseline, 'search': found, 'policy': policy, 'finetune': tuned, 'table': table,
          'summary': summary}


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning the found policy
# ----------------------------------------------------------------------------------------------------------

# (stage name, epochs key in config.finetune, which of the layer's bits apply: weights, activations)
FINETUNE_STAGES = (('finetune_fp', 'fp_epochs', False, False),
                   ('finetune_act', 'act_epochs', False, True),
                   ('finetune_weight_act', 'weight_act_epochs', True, True))
FINETUNE = 'finetune.json'


def stage_bits(bits: dict, weights: bool, activations: bool) -> Optional[dict]:
  """The model's `bits` argument for a stage: each layer's bits on weights and/or activations, else 32."""
  from picpq_jax import bits as bits_lib  # pylint: disable=g-import-not-at-top
  if not (weights or activations):
    return None
  return bits_lib.bits_tree({n: (b if weights else 32, b if activations else 32) for n, b in bits.items()})


def stage_train_config(config, epochs: int) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config.finetune.to_dict())
  cfg.epochs = epochs
  return cfg


def finetune(config: ml_collections.ConfigDict, workdir: str, model, topo, policy: dict) -> dict:
  """Stages 6-7: fine-tune the pruned model, then QAT with activations, then weights and activations.

  Each stage starts from the best validation checkpoint of the previous one (the baseline for the first),
  is resumable, and keeps the pruned weights at exactly 0. Writes <workdir>/finetune.json (per stage:
  validation accuracy, best epoch, wall time; final test accuracy, measured once).
  """
  from picpq_jax import pruning  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, FINETUNE)
  if os.path.exists(path):
    return metrics.read_json(path)
  masks, bits = policy_arrays(policy)
  baseline = load_baseline(config, workdir)
  variables = {'params': pruning.zero_pruned_weights(topo, baseline['params'], masks),
               'batch_stats': baseline['batch_stats']}
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
    result = training.fit(config, workdir, model, stage=name, init_variables=variables, masks=masks,
                          bits=stage_bits(bits, on_weights, on_acts), train_cfg=stage_train_config(config, epochs),
                          select_best=True, teacher=baseline)
    variables = training.load_variables(workdir, name, config, best=True)
    stages[name] = {'epochs': epochs, 'best_val_accuracy': result['best']['accuracy'],
                    'best_epoch': result['best']['epoch'] + 1, 'wall_time_s': result['wall_time_s']}
  final_bits = stage_bits(bits, True, True)
  summary = {
      'stages': stages,
      'activation_scale': activation_scale,
      'validation': evaluate_split(config, model, variables, 'validation', masks, final_bits),
      'test': evaluate_split(config, model, variables, 'test', masks, final_bits),
  }
  metrics.write_json(path, summary)
  return summary


EXPORT = 'model_export.npz'


def load_policy(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The policy.json of a search workdir, checked to belong to this config's architecture."""
  path = os.path.join(workdir, POLICY)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} has no {POLICY}: the search there is incomplete or never ran; run '
                            f'search.py --workdir {workdir} with the same config first.')
  policy = metrics.read_json(path)
  if policy.get('arch') != config.model.arch:
    raise ValueError(f'{path} is a policy for {policy.get("arch")} but model.arch={config.model.arch!r}; use the '
                     'config the search ran with.')
  return policy


def export_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage 8: the fine-tuned, quantized model as a slimmed, integer-coded file (<workdir>/model_export.npz).

  BatchNorm folded or kept as config.export.fold_bn says. Returns the size report (dense FP32 bytes, file
  bytes, ratio) and, on config.export.check_images test images, the largest |logit difference| between the
  loaded export and the masked fake-quantized model.
  """
  from picpq_jax import export  # pylint: disable=g-import-not-at-top
  policy = load_policy(config, workdir)
  last = FINETUNE_STAGES[-1][0]
  directory = os.path.join(workdir, last + '_best')
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise FileNotFoundError(f'{workdir} has no fine-tuned checkpoint ({directory}); run the fine-tuning first '
                            '(search.py with finetune.enabled=True, or train.py --finetune).')
  variables = training.load_variables(workdir, last, config, best=True)
  masks, bits = policy_arrays(policy)
  info = data.dataset_info(config.data)
  spec = models.get_spec(config.model.arch, info.num_classes, info.image_size, info.in_channels)
  path = os.path.join(workdir, EXPORT)
  report = export.export_model(path, spec, variables, masks, bits, fold_bn=config.export.fold_bn,
                               meta={'dataset': config.data.name})
  n = config.export.check_images
  if n > 0:
    n = min(n, info.num_test)
    images = data.fixed_batches(config.data, 'test', n, 1, seed=config.seed, train=False)['image'][0]
    diff = export.logit_difference(path, spec, variables, masks, bits, images)
    report = {**report, 'checked_images': n, 'max_logit_difference': float(diff.max())}
  return report


def finetune_policy(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """train.py --finetune: the fine-tuning stages and the export for the policy a search left in workdir."""
  policy = load_policy(config, workdir)
  if not os.path.exists(os.path.join(workdir, BASELINE + '.json')):
    raise FileNotFoundError(f'{workdir} has a policy but no baseline; it is not a complete search workdir.')
  model, info = build_model(config)
  topo = build_topology(config, info)
  tuned = finetune(config, workdir, model, topo, policy)
  return {'finetune': tuned, 'export': export_run(config, workdir)}
