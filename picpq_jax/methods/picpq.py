"""PIC-PQ as a method (METHOD.md): filter properties -> (a, b) search by aging evolution -> global ranking
to the FLOPs target -> bits from how much of each layer survived.

Its settings are `config.search`. Stages, each saved in the workdir (a stopped run resumes where it stopped):
filter_properties.npz, search/ (orbax, every round) and search.json + search_history.npz + search_loss.png,
then policy.json. The fine-tuning that follows is the shared one (pipeline.py).
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from picpq_jax import bits as bits_lib
from picpq_jax import checkpoints, cost, criteria, data, evolution, fitness, pruning, report, topology, training
from picpq_jax import policy as policy_lib
from picpq_jax.methods import Context, Result

NAME = 'picpq'
SECTION = 'search'
PROVENANCE = (
    '[paper, code] global filter ranking a_l * FP + b_l to a FLOPs target, (a, b) by aging evolution, '
    'bits = B_max - ceil(lambda / s_l), the three fine-tuning stages',
    '[code] B_max per layer, tau, keep fraction and fine-tune epochs of each experiment (configs/)',
    '[ours] failed (NaN) candidates lose tournaments; >= 1 mutated layer; std 1.0 for constant filter '
    'properties; min_bits 2; repeated pruning plans reuse their loss (search.cache_plans); K children per '
    'round (search.num_children); precise BatchNorm and optional distillation in fine-tuning',
    '[ours, as LeGR does] one searched (a, b) reused for other targets (search.ranking=\'reuse\'); a BOPs '
    'target met by scanning keep fractions (search.bops_ratio); the identity ranking (a = 1, b = 0) as the '
    'no-search row of the comparison',
)

RANKINGS = ('search', 'identity', 'reuse')
FILTER_PROPERTIES = 'filter_properties.npz'
SEARCH = 'search'
SEARCH_RESULT = 'search.json'


def run(context: Context) -> Result:
  """Filter properties, the search, then the policy of the best candidate."""
  c, workdir = context.config, context.workdir
  fp = compute_filter_properties(c, workdir, context.model, context.topology, context.baseline)
  found = find_ranking(c, workdir, context.model, context.topology, context.baseline, fp)
  policy = derive_policy(c, workdir, context.topology, context.baseline, fp, found)
  return Result(policy=policy, model=context.model, variables=None, summary=found)


def check_config(config: ml_collections.ConfigDict, topo) -> None:
  """Settings the search cannot run with, reported before any work starts."""
  s = config.search
  model = f'{topo.arch} ({topo.num_layers} prunable convs)'
  if isinstance(s.keep_fraction, bool) or not 0 < s.keep_fraction <= 1:
    raise ValueError(f'search.keep_fraction={s.keep_fraction!r} must lie in (0, 1]: it is the fraction of the '
                     f'dense FLOPs of {model} that the pruned model keeps, e.g. 0.45.')
  if isinstance(s.tau, bool) or not isinstance(s.tau, (int, np.integer)) or s.tau < 0:
    raise ValueError(f'search.tau={s.tau!r} must be a non-negative integer: it counts the SGD steps that fine-tune '
                     f'each pruned candidate of {model} before its fitness is measured (0 skips them; the '
                     'original uses 200).')
  for key, low, meaning in (('population', 2, 'candidates alive at a time, e.g. 64'),
                            ('tournament', 1, 'candidates drawn per tournament, e.g. 16'),
                            ('calibration_batches', 1, 'training batches the feature-map rank reads, e.g. 6'),
                            ('chunk_size', 1, 'candidates evaluated at once on each device, e.g. 1'),
                            ('check_every', 1, 'ranked filters between cost checks: 1, or 10 as the original')):
    if not _is_int(s[key]) or s[key] < low:
      raise ValueError(f'search.{key}={s[key]!r} must be an integer >= {low}: the {meaning}.')
  if not _is_number(s.safeguard) or not 0 <= s.safeguard < 1:
    raise ValueError(f'search.safeguard={s.safeguard!r} must lie in [0, 1): the fraction of each layer\'s channels '
                     'pruning must keep, e.g. 0.1.')
  if not _is_int(s.min_bits) or not bits_lib.MIN_BITS <= s.min_bits <= bits_lib.MAX_BITS:
    raise ValueError(f'search.min_bits={s.min_bits!r} must be an integer in {bits_lib.MIN_BITS}..'
                     f'{bits_lib.MAX_BITS}: the fewest bits a pruned layer gets, e.g. 2.')
  if not _is_number(s.bit_penalty) or not np.isfinite(s.bit_penalty) or s.bit_penalty < 0:
    raise ValueError(f'search.bit_penalty={s.bit_penalty!r} must be a finite number >= 0: lambda of bits = B_max - '
                     'ceil(lambda / s), e.g. 1/6 (0 keeps every layer at its B_max).')
  topology.check_b_max(s.b_max, topo)
  if s.criterion not in criteria.PROPERTIES:
    raise ValueError(f'search.criterion={s.criterion!r} is not a filter property; choose one of '
                     f'{list(criteria.PROPERTIES)}.')
  fitness.resolve_eval_mode(s.eval_mode, tau=s.tau, quantize=s.quantize)
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
  if s.ranking not in RANKINGS:
    raise ValueError(f'search.ranking={s.ranking!r} is not a source of (a, b); choose one of {list(RANKINGS)}.')
  if s.ranking == 'reuse' and not s.ranking_workdir:
    raise ValueError("search.ranking='reuse' needs search.ranking_workdir: the run directory whose search.json "
                     '(found on the same baseline) to reuse.')
  if isinstance(s.bops_ratio, bool) or not np.isfinite(s.bops_ratio) or (s.bops_ratio != 0 and s.bops_ratio <= 1):
    raise ValueError(f'search.bops_ratio={s.bops_ratio!r} must be 0 (off: the FLOPs target keep_fraction) or a '
                     'finite ratio > 1 of dense FP32 BOPs to the policy\'s, e.g. 50.')
  if not 0 < s.bops_step < 1:
    raise ValueError(f'search.bops_step={s.bops_step!r} must lie in (0, 1): the spacing of the keep fractions '
                     'scanned for search.bops_ratio, e.g. 0.01.')
  if s.val_batch_size > config.data.val_size:
    raise ValueError(f'search.val_batch_size={s.val_batch_size} exceeds data.val_size={config.data.val_size}; '
                     'the fitness needs at least one full validation batch.')


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def compute_filter_properties(config, workdir: str, model, topo, variables) -> dict:
  """Stage 2: per-layer FP vectors (saved to <workdir>/filter_properties.npz)."""
  path = os.path.join(workdir, FILTER_PROPERTIES)
  if os.path.exists(path):
    return checkpoints.read_npz(path)
  s = config.search
  batches = None
  if s.criterion == 'rank':
    # Eval-mode BatchNorm on the same un-augmented training images for every layer, in one forward pass per
    # batch. Ours: the original (generate_rank.py) hooks one layer at a time and runs a fresh pass over its
    # shuffled, augmented train_loader for each, so every layer sees other (augmented) images.
    batches = data.fixed_batches(config.data, 'train', s.calibration_batch_size, s.calibration_batches,
                                 seed=config.seed, train=False)['image']
  fp = criteria.filter_properties(model, variables, batches, s.criterion)
  checkpoints.write_npz(path, fp)
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


def find_ranking(config, workdir: str, model, topo, variables, fp) -> dict:
  """(a, b) and how they were found, as search.json holds them: searched here, the identity, or reused."""
  ranking = config.search.ranking
  if ranking == 'search':
    return run_search(config, workdir, model, topo, variables, fp)
  path = os.path.join(workdir, SEARCH_RESULT)
  if os.path.exists(path):
    return checkpoints.read_json(path)
  if ranking == 'identity':
    found = identity_ranking(config.model.arch, topo.num_layers)
  else:
    found = reused_ranking(config.search.ranking_workdir, config.model.arch, topo.num_layers)
  checkpoints.write_json(path, found)
  return found


def identity_ranking(arch: str, num_layers: int) -> dict:
  """a = 1, b = 0 in every layer: the filter property itself, ranked globally (no search)."""
  return {'arch': arch, 'strategy': 'identity', 'evaluations': 0, 'best_loss': None,
          'a': [1.0] * num_layers, 'b': [0.0] * num_layers, 'wall_time_s': 0.0}


def reused_ranking(source_workdir: str, arch: str, num_layers: int) -> dict:
  """The best (a, b) of the search finished in source_workdir (search.ranking='reuse')."""
  path = os.path.join(source_workdir, SEARCH_RESULT)
  if not os.path.exists(path):
    raise FileNotFoundError(f'search.ranking_workdir={source_workdir!r} holds no {SEARCH_RESULT}; run the search '
                            'there first (search.ranking=\'search\'), or point it at a finished PIC-PQ run.')
  found = checkpoints.read_json(path)
  if found.get('arch') != arch or len(found.get('a', ())) != num_layers:
    raise ValueError(f'search.ranking_workdir={source_workdir!r} holds the search of a {found.get("arch")} '
                     f'with {len(found.get("a", ()))} prunable layers, not of model.arch={arch!r} '
                     f'({num_layers}); point it at a search of this model on this baseline.')
  return {**found, 'ranking_from': os.path.abspath(source_workdir), 'wall_time_s': 0.0}


def run_search(config, workdir: str, model, topo, variables, fp) -> dict:
  """Stage 3: the evolutionary search over (a, b); checkpointed every round under <workdir>/search.

  Writes <workdir>/search.json (best candidate, decoded) and search_history.npz (every candidate's a, b,
  loss, FLOPs), and the plot search_loss.png. Returns the search.json content.
  """
  path = os.path.join(workdir, SEARCH_RESULT)
  if os.path.exists(path):
    return checkpoints.read_json(path)
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
  failure = search_failure(loss, float(result.best_fitness), s, info.num_classes)
  if failure:
    raise FloatingPointError(failure)
  checkpoints.write_npz(os.path.join(workdir, 'search_history.npz'), {
      'a': a_hist, 'b': b_hist, 'loss': loss, 'flops': hist_info['flops'], 'reached': hist_info['reached'],
      'repeated_plan': repeated})
  saved = int(repeated.sum()) if s.cache_plans else 0
  report.plot_search(loss, os.path.join(workdir, 'search_loss.png'),
                     f'{config.model.arch} on {config.data.name}: {s.strategy}', repeated=repeated)
  best_a, best_b = (np.asarray(v).tolist() for v in evolution.decode(result.best_solution, std))
  summary = {'arch': config.model.arch, 'strategy': s.strategy, 'evaluations': int(len(loss)),
             'distinct_plans': int(len(loss) - repeated.sum()), 'evaluations_saved': saved,
             'best_loss': float(result.best_fitness), 'a': best_a, 'b': best_b,
             'failed_candidates': int(np.sum(~np.isfinite(loss))), 'wall_time_s': wall,
             'candidates_per_s': len(loss) / max(wall, 1e-9)}
  checkpoints.write_json(path, summary)
  return summary


def search_failure(loss: np.ndarray, best_loss: float, s, num_classes: int) -> Optional[str]:
  """One sentence when the search found nothing usable (its best loss diverged, or more than half of its
  candidates failed: a NaN, infinite or diverged loss, training.diverged), naming the setting that most likely
  caused it; None when it is usable. s: config.search."""
  failed = sum(training.diverged(float(v), num_classes) for v in np.asarray(loss, np.float64))
  if not training.diverged(best_loss, num_classes) and 2 * failed <= len(loss):
    return None
  likely = (f'lower search.learning_rate (now {s.learning_rate})' if s.tau > 0 else
            'check the baseline (search.tau=0: the candidates were not trained, so the baseline itself fails)')
  return (f'the search found no usable candidate ({failed} of {len(loss)} failed with a NaN, infinite or diverged '
          f'loss, the best loss is {best_loss:.4g}); {likely}, and add --config.recompute=search to search again.')


def derive_policy(config, workdir: str, topo, variables, fp, found: dict) -> policy_lib.Policy:
  """Stages 4-5: masks of the best (a, b) by global ranking, then bits from the surviving magnitude.

  Writes <workdir>/policy.json (policy.py's format); an existing one (of this architecture) is reused.
  """
  path = os.path.join(workdir, policy_lib.POLICY_FILE)
  if os.path.exists(path):
    return policy_lib.read_policy(path, config.model.arch)
  s = config.search
  policy_at = functools.partial(policy_at_keep_fraction, config, topo, variables['params'], fp,
                                np.asarray(found['a']), np.asarray(found['b']))
  if s.bops_ratio:
    policy = keep_fraction_for_bops(policy_at, s.bops_ratio, s.bops_step)
  else:
    policy = policy_at(s.keep_fraction)
  policy_lib.write_policy(workdir, policy)
  return policy


def policy_at_keep_fraction(config, topo, baseline_params, fp, a, b, keep_fraction: float) -> policy_lib.Policy:
  """The deterministic prune-and-assign: masks of (a, b) by global ranking to keep_fraction of the dense
  FLOPs, bits from the surviving magnitude, the ledger in its summary. ValueError when out of reach."""
  s = config.search
  masks, _ = pruning.global_prune(topo, fp, a, b, keep_fraction, s.safeguard, s.check_every)
  masks = {k: np.asarray(v) for k, v in masks.items()}
  bits = bits_lib.assign_bits(topo, baseline_params, masks, None, s.bit_penalty, s.min_bits)
  settings = {'keep_fraction': keep_fraction, 'ranking': s.ranking}
  if s.bops_ratio:
    settings['bops_ratio_target'] = s.bops_ratio
  policy = policy_lib.from_masks_and_bits(config.model.arch, config.data.name, NAME, masks, bits,
                                          settings=settings)
  return policy_lib.replace_summary(policy, cost.ledger(topo, policy))


def keep_fraction_grid(step: float) -> list[float]:
  """1, 1 - step, 1 - 2 step, ... while > 0 (rounded to 1e-9, so 0.01 steps print as 0.57, not 0.5700001)."""
  return [round(1.0 - i * step, 9) for i in range(int(np.ceil(1.0 / step - 1e-9)))]


def keep_fraction_for_bops(policy_at: Callable[[float], policy_lib.Policy], bops_ratio: float,
                           step: float) -> policy_lib.Policy:
  """The policy of the largest keep fraction on the grid whose BOPs compression reaches bops_ratio.

  A scan from the top rather than a bisection: the bits follow the survivors' magnitude, so the ratio need not
  grow monotonically as the keep fraction falls, and the first fraction that reaches the target is the answer
  by construction (the one a grid step above it does not).
  """
  best = 0.0
  for keep in keep_fraction_grid(step):
    try:
      policy = policy_at(keep)
    except ValueError:  # below what the safeguard allows: nothing smaller is reachable either
      break
    ratio = policy.summary['bops_compression']
    if ratio >= bops_ratio:
      return policy
    best = max(best, ratio)
  raise ValueError(f'search.bops_ratio={bops_ratio} is out of reach: the most any keep fraction on the '
                   f'{step} grid gives is {best:.2f}x fewer BOPs; lower search.bops_ratio, or lower '
                   'search.safeguard / search.min_bits.')


