"""Every method of a config on one baseline: one table, one accuracy-versus-BOPs plot (BASELINES.md, "How they
are compared").

A comparison config is a run config (the shared data, model, baseline training and fine-tuning budget) with a
`compare` section:

    compare.seeds  fine-tune every policy with this many seeds (finetune.seed = seed, seed + 1, ...)
    compare.order  the rows to run, in table order (empty: every row, by name)
    compare.compile_cache  keep compiled programs in <workdir>/jax_cache for the later runs (default True)
    compare.rows   row name -> {'method': registered name, 'label': shown name,
                                'base': {dotted key: value} for every setting of the row (optional),
                                'settings': ({dotted key: value}, ...) one run each}

A setting may change only its method's own config section (picpq: `search`, codeq: `codeq`, ...), so every
row shares the baseline, the data and the fine-tuning; a row's `base` may also switch the shared fine-tuning
off for a method whose training is its quantization-aware training (CoDeQ). Layout of the workdir:

    baseline/                    the dense baseline (trained once, or reused)
    picpq_search/                PIC-PQ's (a, b) search, run once: every PIC-PQ setting reuses its ranking
    runs/<row>/<k>/              one resumable run directory per (row, setting k), the baseline linked in
    runs/<row>/<k>/seed<i>/      the fine-tuning repeated with finetune.seed = seed + i
    jax_cache/                   XLA's compiled programs, shared by the runs (compare.compile_cache)
    comparison.json, comparison.md, pareto.png

Nothing here reads the test split to choose anything: fine-tuning keeps its best validation epoch, a BOPs
target is met without data, and the test accuracy only enters the table.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import traceback
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np

from picpq_jax import checkpoints, hosts, methods, pipeline, report, xla_setup

BASELINE_DIR = 'baseline'
SEARCH_DIR = 'picpq_search'
RUNS_DIR = 'runs'
COMPILE_CACHE = 'jax_cache'
COMPARISON_JSON = 'comparison.json'
COMPARISON_MD = 'comparison.md'
PARETO_PNG = 'pareto.png'
# The baseline stage's files a run directory links to instead of training its own.
BASELINE_FILES = (pipeline.BASELINE, pipeline.BASELINE + '.json')


@dataclasses.dataclass(frozen=True)
class Run:
  """One (row, setting): its config, its run directory, the overrides that made it."""
  row: str
  label: str
  method: str
  index: int
  overrides: Mapping[str, Any]
  config: Any
  workdir: str


# ----------------------------------------------------------------------------------------------------------
# Configs of the runs, checked before any work
# ----------------------------------------------------------------------------------------------------------


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str) -> ml_collections.ConfigDict:
  """A copy of `config` with each dotted key set; ValueError naming `where` for a key the config lacks."""
  out = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *path, leaf = key.split('.')
    node = out
    for part in path:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ValueError(f'{where}: {key!r} is not a setting of the config (see configs/common.py for the keys).')
      node = node[part]
    if leaf not in node:
      raise ValueError(f'{where}: {key!r} is not a setting of the config (see configs/common.py for the keys).')
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f'{where}: {key}={value!r} does not fit the setting ({e}).') from None
  return out


def check_setting_keys(row: str, method: str, overrides: Mapping[str, Any], where: str,
                       own_section_only: bool) -> None:
  """One sentence for a key of another method's section, or (own_section_only) outside the method's own."""
  owners = methods.sections()
  section = getattr(methods.get(method), 'SECTION', None)
  for key in overrides:
    top = key.split('.')[0]
    if owners.get(top, method) != method:
      raise ValueError(f'{where}: {key} is a setting of method {owners[top]!r}, but row {row!r} runs '
                       f'{method!r}; move it to a row of {owners[top]!r} or drop it.')
    if own_section_only and top != section:
      raise ValueError(f'{where}: {key} is outside {method!r}\'s own section ({section!r}); a setting may only '
                       'change its method, so that every row shares the baseline, data and fine-tuning (put '
                       'row-wide changes in the row\'s "base").')


def plan_runs(config: ml_collections.ConfigDict, workdir: str) -> list[Run]:
  """Every (row, setting) of config.compare.rows as a Run, each config checked (ValueError, one sentence)."""
  rows = config.compare.rows
  if not rows:
    raise ValueError('compare.rows is empty; give at least one row (see configs/compare_mnist5k.py).')
  order = tuple(config.compare.get('order') or sorted(rows))
  unknown = [r for r in order if r not in rows]
  if unknown:
    raise ValueError(f'compare.order names rows {unknown} that compare.rows does not define; choose from '
                     f'{sorted(rows)}.')
  runs = []
  for row in order:
    spec, where = rows[row], f'compare.rows.{row}'
    method = spec.get('method')
    try:
      methods.get(method)
    except ValueError:
      raise ValueError(f'{where}.method={method!r} is not a registered method; choose one of '
                       f'{list(methods.names())}.') from None
    base = dict(spec.get('base') or {})
    settings = tuple(spec.get('settings') or ())
    if not settings:
      raise ValueError(f'{where}.settings is empty; give one dict of {method!r} settings per run, e.g. '
                       f'({{}},) for its defaults.')
    check_setting_keys(row, method, base, f'{where}.base', own_section_only=False)
    row_config = apply_overrides(config, {'method.name': method, **base}, f'{where}.base')
    for k, overrides in enumerate(settings):
      check_setting_keys(row, method, overrides, f'{where}.settings[{k}]', own_section_only=True)
      run_config = apply_overrides(row_config, overrides, f'{where}.settings[{k}]')
      if method == 'picpq' and run_config.search.ranking == 'search':
        # One learned ranking for every target: the search runs once, in SEARCH_DIR.
        run_config = apply_overrides(run_config, {'search.ranking': 'reuse',
                                                  'search.ranking_workdir': os.path.join(workdir, SEARCH_DIR)},
                                     where)
      runs.append(Run(row=row, label=spec.get('label') or row, method=method, index=k,
                      overrides=dict(overrides), config=run_config,
                      workdir=os.path.join(workdir, RUNS_DIR, row, str(k))))
  return runs


def search_config(config: ml_collections.ConfigDict, runs: list[Run]) -> Optional[ml_collections.ConfigDict]:
  """The config of the one PIC-PQ search the reusing rows need (None if no row does): the first such row's
  config with the search's own ranking and the FLOPs target search.keep_fraction."""
  for run in runs:
    if run.method == 'picpq' and run.config.search.ranking == 'reuse' and run.config.search.ranking_workdir \
        .endswith(SEARCH_DIR):
      return apply_overrides(run.config, {'search.ranking': 'search', 'search.ranking_workdir': '',
                                          'search.bops_ratio': 0.0}, 'compare')
  return None


def check_baseline(config: ml_collections.ConfigDict, workdir: str) -> None:
  """One sentence if workdir already holds a baseline of another architecture or dataset."""
  path = os.path.join(workdir, BASELINE_DIR, pipeline.BASELINE + '.json')
  if not os.path.exists(path):
    return
  saved = checkpoints.read_json(path)
  for key, asked in (('arch', config.model.arch), ('dataset', config.data.name)):
    if saved.get(key) != asked:
      raise ValueError(f'{workdir} holds a baseline of {key} {saved.get(key)!r}, but the config asks for '
                       f'{asked!r}; use a fresh --workdir for this comparison.')


def check_comparison(config: ml_collections.ConfigDict, workdir: str) -> list[Run]:
  """Every check of every run, before any training; returns the runs."""
  if 'compare' not in config:
    raise ValueError('the config has no `compare` section; compare.py needs one (see '
                     'configs/compare_mnist5k.py).')
  seeds = config.compare.seeds
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f'compare.seeds={seeds!r} must be a positive integer (1: one fine-tuning per policy).')
  check_baseline(config, workdir)
  runs = plan_runs(config, workdir)
  for run in runs:
    try:
      pipeline.check_config(run.config)
    except ValueError as e:
      raise ValueError(f'compare.rows.{run.row}.settings[{run.index}]: {e}') from None
  return runs


# ----------------------------------------------------------------------------------------------------------
# Numbers of a run, pure
# ----------------------------------------------------------------------------------------------------------


def seed_statistics(values: list[float]) -> dict:
  """mean, sample standard deviation (0 for one value), min, max and count of per-seed accuracies."""
  v = np.asarray(values, np.float64)
  return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if v.size > 1 else 0.0,
          'min': float(v.min()), 'max': float(v.max()), 'n': int(v.size)}


def method_wall_time(summary: Mapping[str, Any]) -> float:
  """Seconds of one run after the shared baseline: the method and its fine-tuning stages."""
  return float(sum(v for k, v in summary['wall_time_s'].items() if k != 'baseline' and v is not None))


def row_record(run: Run, summary: Mapping[str, Any], seed_results: list[dict]) -> dict:
  """The comparison's row of one finished run (summary: pipeline.run_summary's; seed_results: the repeated
  fine-tunings' {'validation', 'test'})."""
  tests = [summary['compressed_test_accuracy']] + [r['test']['accuracy'] for r in seed_results]
  vals = [summary['compressed_validation_accuracy']] + [r['validation']['accuracy'] for r in seed_results]
  trained = tests[0] is not None
  return {
      'row': run.row, 'label': run.label, 'method': run.method, 'setting': dict(run.overrides),
      'status': 'done', 'policy_settings': summary['settings'],
      'bops_compression': summary['bops_compression'],
      'sparse_bops_compression': summary['sparse_bops_compression'],
      'weight_bits_compression': summary['weight_bits_compression'],
      'flops_compression': summary['flops_compression'],
      'conv_weight_sparsity': summary['conv_weight_sparsity'],
      'test_accuracy': seed_statistics(tests) if trained else None,
      'validation_accuracy': seed_statistics(vals) if trained else None,
      'accuracy_drop': summary['baseline_test_accuracy'] - float(np.mean(tests)) if trained else None,
      'wall_time_s': method_wall_time(summary),
      'workdir': run.workdir,
  }


def failed_record(run: Run, error: BaseException) -> dict:
  message = ' '.join(str(error).split()) or type(error).__name__
  return {'row': run.row, 'label': run.label, 'method': run.method, 'setting': dict(run.overrides),
          'status': 'failed', 'error': f'{type(error).__name__}: {message}', 'workdir': run.workdir}


# ----------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------


def link_baseline(baseline_dir: str, workdir: str) -> None:
  """Make workdir a run directory whose baseline stage is baseline_dir's (relative symlinks)."""
  if hosts.is_writer():
    os.makedirs(workdir, exist_ok=True)
    for name in BASELINE_FILES:
      target = os.path.join(workdir, name)
      if not os.path.lexists(target):
        os.symlink(os.path.relpath(os.path.join(baseline_dir, name), workdir), target)
  hosts.barrier('link ' + workdir)


def repeat_finetuning(run: Run, baseline_dir: str, seeds: int) -> list[dict]:
  """Fine-tune the run's policy again with finetune.seed = seed + 1, ..., seed + seeds - 1 (each resumable in
  run.workdir/seed<i>); [] when the run has no shared fine-tuning."""
  if seeds <= 1 or not run.config.finetune.enabled:
    return []
  result = pipeline.run_method(run.config, run.workdir)  # finished: loaded, not recomputed
  topo = pipeline.build_topology(run.config)
  out = []
  for i in range(1, seeds):
    seed_dir = os.path.join(run.workdir, f'seed{i}')
    link_baseline(baseline_dir, seed_dir)
    seeded = apply_overrides(run.config, {'finetune.seed': run.config.seed + i}, 'compare.seeds')
    out.append(pipeline.finetune(seeded, seed_dir, topo, result))
  return out


def run_one(run: Run, baseline_dir: str, seeds: int) -> dict:
  """One (row, setting): the whole pipeline in its run directory, then the repeated fine-tunings."""
  link_baseline(baseline_dir, run.workdir)
  summary = pipeline.compress(run.config, run.workdir)['summary']
  return row_record(run, summary, repeat_finetuning(run, baseline_dir, seeds))


def compare(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Check everything, train (or reuse) the baseline, run PIC-PQ's search once, then every (row, setting);
  a setting that fails is recorded and the others go on. Writes comparison.json / .md and pareto.png."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  runs = check_comparison(config, workdir)
  if config.compare.get('compile_cache', True):
    xla_setup.use_compile_cache(os.path.join(workdir, COMPILE_CACHE))
  baseline_dir = os.path.join(workdir, BASELINE_DIR)
  baseline = pipeline.train_baseline(config, baseline_dir)
  searched = search_config(config, runs)
  search = None
  if searched is not None:
    search_dir = os.path.join(workdir, SEARCH_DIR)
    link_baseline(baseline_dir, search_dir)
    search = dict(pipeline.run_method(searched, search_dir).summary)
  records = []
  for run in tqdm(runs, desc='comparison', unit='run'):
    tqdm.write(f'{run.label} [{run.index}] {run.overrides} -> {run.workdir}')
    try:
      records.append(run_one(run, baseline_dir, config.compare.seeds))
    except KeyboardInterrupt:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if os.environ.get('PICPQ_DEBUG'):
        traceback.print_exc()
      records.append(failed_record(run, e))
      tqdm.write(f'  failed: {records[-1]["error"]}')
  comparison = {
      'arch': config.model.arch, 'dataset': config.data.name, 'seeds': config.compare.seeds,
      'finetune_epochs': {k: config.finetune[k] for k in ('fp_epochs', 'act_epochs', 'weight_act_epochs')},
      'baseline': {'test_accuracy': baseline['test']['accuracy'],
                   'validation_accuracy': baseline['validation']['accuracy'],
                   'wall_time_s': baseline.get('wall_time_s')},
      'search': search, 'rows': records,
      'provenance': {name: list(getattr(methods.get(name), 'PROVENANCE', ())) for name in
                     dict.fromkeys(r.method for r in runs)},
      'machine': f'{platform.machine()} {platform.processor() or ""}'.strip(),
      'date': datetime.date.today().isoformat(),
  }
  checkpoints.write_json(os.path.join(workdir, COMPARISON_JSON), comparison)
  checkpoints.atomic_write(os.path.join(workdir, COMPARISON_MD),
                           lambda f: f.write(report.comparison_markdown(comparison)))
  report.plot_pareto(comparison, os.path.join(workdir, PARETO_PNG))
  return comparison
