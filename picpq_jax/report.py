"""What a run reports: tables and plots of the numbers the stages gathered (the cost ledger's, the
accuracies); formatting only, nothing here computes a figure."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from picpq_jax import checkpoints

FP32 = 32


def policy_table(summary: Mapping[str, Any]) -> str:
  """Plain text for the terminal: kept channels, bits and weight density per layer, then the ledger's
  FLOPs, BOPs and (for weight-level sparsity) sparse BOPs and weight bits before and after."""
  s = summary
  lines = [f'{"layer":<22} {"kept":>9} {"w/a bits":>8} {"density":>7}  chain']
  for r in s['layers']:
    lines.append(f'{r["layer"]:<22} {r["kept"]:>4}/{r["channels"]:<4} {r["weight_bits"]:>3}/{r["act_bits"]:<4} '
                 f'{r["density"]:>7.3f}  {r["chain"]}')
  lines += [
      f'FLOPs (MACs): {s["flops_dense"] / 1e6:.2f} M -> {s["flops"] / 1e6:.2f} M '
      f'({100 * s["flops_kept_fraction"]:.1f} % kept)',
      f'params:       {s["params_dense"] / 1e6:.3f} M -> {s["params"] / 1e6:.3f} M',
      f'BOPs:         {s["bops_dense"] / 1e9:.2f} G -> {s["bops"] / 1e9:.3f} G '
      f'(compression {s["bops_compression"]:.2f}x against dense FP32)',
  ]
  if s['conv_weight_sparsity'] > 0:
    lines += [
        f'sparse BOPs:  {s["bops_dense"] / 1e9:.2f} G -> {s["sparse_bops"] / 1e9:.3f} G '
        f'({s["sparse_bops_compression"]:.2f}x; only on hardware that skips zero weights)',
        f'weight bits:  {s["weight_bits_dense"] / 8e6:.3f} MB -> {s["weight_bits"] / 8e6:.3f} MB '
        f'({s["weight_bits_compression"]:.2f}x; {100 * s["conv_weight_sparsity"]:.1f} % of conv weights are 0)',
    ]
  return '\n'.join(lines)


def plot_search(history_loss: np.ndarray, path: str, title: str = '',
                repeated: Optional[np.ndarray] = None) -> None:
  """Loss of every evaluated candidate against the evaluation index, with the best-so-far curve.

  repeated: (N,) bool, candidates whose pruning plan an earlier one already had (drawn hollow; with
  search.cache_plans they took the stored loss without running).
  """
  plt = _plt()
  loss = np.asarray(history_loss, np.float64)
  x = np.arange(1, len(loss) + 1)
  best = np.fmin.accumulate(np.where(np.isfinite(loss), loss, np.inf))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  repeated = np.zeros(len(loss), bool) if repeated is None else np.asarray(repeated, bool)
  ax.scatter(x[~repeated], loss[~repeated], s=8, alpha=0.5, label='new plan')
  if repeated.any():
    ax.scatter(x[repeated], loss[repeated], s=14, facecolors='none', edgecolors='C2',
               label=f'repeated plan ({int(repeated.sum())})')
  ax.plot(x, np.where(np.isfinite(best), best, np.nan), color='C3', label='best so far')
  ax.set_xlabel('evaluation')
  ax.set_ylabel('validation cross-entropy after tau steps')
  ax.set_title(title or 'PIC-PQ search')
  ax.legend()
  _save(fig, path)


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> None:
  fig.tight_layout()
  try:
    checkpoints.atomic_write(path, lambda f: fig.savefig(f, dpi=120, format='png'), binary=True)
  finally:
    _plt().close(fig)


def plot_layers(rows: list[dict], path: str, title: str = '') -> None:
  """Per-layer bars: kept / total channels (top) and bits (bottom)."""
  plt = _plt()
  x = np.arange(len(rows))
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.22 * len(rows)), 5), sharex=True)
  top.bar(x, [r['channels'] for r in rows], color='0.85', label='channels')
  top.bar(x, [r['kept'] for r in rows], color='C0', label='kept')
  top.set_ylabel('output channels')
  top.legend()
  top.set_title(title or 'compression policy')
  bottom.bar(x - 0.2, [r['weight_bits'] for r in rows], width=0.4, color='C2', label='weights')
  bottom.bar(x + 0.2, [r['act_bits'] for r in rows], width=0.4, color='C1', label='activations')
  bottom.set_ylabel('bits')
  bottom.legend(fontsize=7)
  bottom.set_xticks(x, [r['layer'] for r in rows], rotation=90, fontsize=6)
  _save(fig, path)


def markdown(summary: Mapping[str, Any]) -> str:
  """summary.md: accuracy and the cost ledger's columns (BOPs, and sparse figures only under their own names),
  the per-layer policy, the export, the method's own figures and provenance, wall times."""
  s = summary
  acc = lambda v: '-' if v is None else f'{100 * v:.2f} %'  # noqa: E731
  lines = [
      f'# {s["arch"]} on {s["dataset"]}: {s.get("method", "picpq")}', '',
      '| | dense FP32 | compressed | ratio |', '|---|---|---|---|',
      f'| test accuracy | {acc(s["baseline_test_accuracy"])} | {acc(s["compressed_test_accuracy"])} | '
      f'drop {acc(s.get("accuracy_drop"))} |',
      f'| FLOPs (MACs) | {s["flops_dense"] / 1e6:.2f} M | {s["flops"] / 1e6:.2f} M | '
      f'{s["flops_compression"]:.2f}x |',
      f'| params | {s["params_dense"] / 1e6:.3f} M | {s["params"] / 1e6:.3f} M | {s["params_compression"]:.2f}x |',
      f'| BOPs | {s["bops_dense"] / 1e9:.2f} G | {s["bops"] / 1e9:.3f} G | {s["bops_compression"]:.2f}x |',
  ]
  if s.get('conv_weight_sparsity'):
    lines += [
        f'| sparse BOPs (zero weights skipped) | {s["bops_dense"] / 1e9:.2f} G | {s["sparse_bops"] / 1e9:.3f} G | '
        f'{s["sparse_bops_compression"]:.2f}x |',
        f'| weight bits (model size) | {s["weight_bits_dense"] / 8e6:.3f} MB | {s["weight_bits"] / 8e6:.3f} MB | '
        f'{s["weight_bits_compression"]:.2f}x |',
        '', f'{100 * s["conv_weight_sparsity"]:.1f} % of the conv weights are zero. BOPs count every weight of '
        'the kept channels; sparse BOPs count only the nonzero ones, a figure only hardware that skips zeros earns.',
    ]
  lines += ['', '| layer | kept | weight / act bits | density | quantizer | chain |', '|---|---|---|---|---|---|']
  lines += [f'| {r["layer"]} | {r["kept"]}/{r["channels"]} | {r["weight_bits"]} / {r["act_bits"]} | '
            f'{r["density"]:.3f} | {r["quantizer"]} | {r["chain"]} |' for r in s['layers']]
  e = s.get('export')
  if e:
    lines += ['', '| export (slimmed, integer codes) | dense FP32 | file | ratio |', '|---|---|---|---|',
              f'| bytes | {e["dense_fp32_bytes"]:,} | {e["export_bytes"]:,} | {e["ratio"]:.2f}x |']
    if e.get('checked_images'):
      lines += ['', f'The loaded export\'s logits differ from the masked, fake-quantized model\'s by at most '
                    f'{e["max_logit_difference"]:.2e} on {e["checked_images"]} test images.']
  m = s.get('method_summary') or {}
  if m.get('strategy') == 'identity':
    lines += ['', 'Ranking: the identity (a = 1, b = 0): the filter property itself, ranked globally; no search.']
  elif m.get('ranking_from'):
    lines += ['', f'Ranking: (a, b) of the search in {m["ranking_from"]} (best validation loss '
                  f'{m["best_loss"]:.4f}), reused for this target.']
  elif m.get('evaluations') is not None and m.get('best_loss') is not None:
    lines += ['', f'Search: {m["evaluations"]} candidates, {m.get("distinct_plans")} distinct pruning plans; '
                  f'{m.get("evaluations_saved") or 0} evaluations saved by reusing the loss of an identical plan. '
                  f'Best validation loss {m["best_loss"]:.4f}.']
  if m.get('target_bops_ratio') is not None and m.get('bops_ratio') is not None:  # a method with a BOPs target
    lines += ['', f'BOPs target: {m["target_bops_ratio"]:.4g}x fewer than dense FP32 asked, '
                  f'{m["bops_ratio"]:.2f}x reached ({100 * (m["bops_ratio"] / m["target_bops_ratio"] - 1):+.1f} %).']
  if s.get('provenance'):
    lines += ['', 'Where each choice comes from ([paper], [code]: the authors\'; [ours]: this toolkit\'s):', '']
    lines += [f'- {p}' for p in s['provenance']]
  lines += ['', '| stage | wall time (s) |', '|---|---|']
  lines += [f'| {k} | {v:.0f} |' for k, v in s['wall_time_s'].items() if v is not None]
  return '\n'.join(lines) + '\n'


def write_run_report(workdir: str, summary: dict) -> None:
  """summary.json, summary.md and layers.png in the run directory."""
  checkpoints.write_json(os.path.join(workdir, 'summary.json'), summary)
  checkpoints.atomic_write(os.path.join(workdir, 'summary.md'), lambda f: f.write(markdown(summary)))
  plot_layers(summary['layers'], os.path.join(workdir, 'layers.png'), f'{summary["arch"]} on {summary["dataset"]}')


def plot_tradeoff(runs_dir: str, path: Optional[str] = None) -> list[dict]:
  """Accuracy against BOPs compression for every run (a summary.json) under `runs_dir`, with each
  architecture's dense baseline at 1x; returns the points plotted."""
  import json  # pylint: disable=g-import-not-at-top
  points = []
  for root, _, files in os.walk(runs_dir):
    if 'summary.json' in files:
      with open(os.path.join(root, 'summary.json')) as f:
        points.append(json.load(f))
  if not points:
    raise ValueError(f'no run under {runs_dir} has a summary.json; run search.py with a --workdir there first.')
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, arch in enumerate(sorted({p['arch'] + ' / ' + p['dataset'] for p in points})):
    runs = [p for p in points if p['arch'] + ' / ' + p['dataset'] == arch]
    ax.scatter([1.0] * len(runs), [100 * p['baseline_test_accuracy'] for p in runs], marker='x', color=f'C{i}')
    tuned = [p for p in runs if p.get('compressed_test_accuracy') is not None]
    ax.scatter([p['bops_compression'] for p in tuned], [100 * p['compressed_test_accuracy'] for p in tuned],
               color=f'C{i}', label=arch)
  ax.set_xscale('log')
  ax.set_xlabel('BOPs compression against dense FP32 (x)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('accuracy against compression (x: dense baselines)')
  ax.legend(fontsize=8)
  _save(fig, path or os.path.join(runs_dir, 'tradeoff.png'))
  return points



def _setting_text(setting: Mapping[str, Any]) -> str:
  return ', '.join(f'{k.split(".")[-1]}={v}' for k, v in setting.items()) or 'defaults'


def _accuracy_text(stats: Optional[Mapping[str, Any]]) -> str:
  if not stats:
    return '-'
  if stats['n'] > 1:
    return f'{100 * stats["mean"]:.2f} ± {100 * stats["std"]:.2f} (n={stats["n"]})'
  return f'{100 * stats["mean"]:.2f}'


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
  """comparison.md: one row per (method, setting) with the ledger's ratios, accuracies and wall time, then the
  baseline, the shared search, failures and each method's provenance."""
  c = comparison
  b = c['baseline']
  ft = c['finetune_epochs']
  lines = [
      f'# Comparison: {c["arch"]} on {c["dataset"]} ({c["date"]}, {c["machine"]})', '',
      f'Dense baseline: test {100 * b["test_accuracy"]:.2f} %, validation {100 * b["validation_accuracy"]:.2f} %. '
      f'Fine-tuning of every policy: {ft["fp_epochs"]} + {ft["act_epochs"]} + {ft["weight_act_epochs"]} epochs '
      f'(full precision, activations quantized, both), best validation epoch kept; {c["seeds"]} seed(s). '
      'Ratios are dense FP32 over compressed; test accuracy in %, drop in points.', '',
      '| method | setting | BOPs ratio | sparse-BOPs ratio | weight-bits ratio | test acc | drop | val acc | '
      'wall time (min) |', '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in c['rows']:
    if r['status'] != 'done':
      lines.append(f'| {r["label"]} | {_setting_text(r["setting"])} | failed: {r["error"]} | | | | | | |')
      continue
    drop = '-' if r['accuracy_drop'] is None else f'{100 * r["accuracy_drop"]:.2f}'
    lines.append(
        f'| {r["label"]} | {_setting_text(r["setting"])} | {r["bops_compression"]:.1f}x | '
        f'{r["sparse_bops_compression"]:.1f}x | {r["weight_bits_compression"]:.1f}x | '
        f'{_accuracy_text(r["test_accuracy"])} | {drop} | {_accuracy_text(r["validation_accuracy"])} | '
        f'{r["wall_time_s"] / 60:.1f} |')
  s = c.get('search')
  if s:
    lines += ['', f'PIC-PQ\'s search ran once ({s.get("evaluations")} evaluations, '
                  f'{(s.get("wall_time_s") or 0) / 60:.1f} min, not in the rows\' wall time); every searched '
                  f'PIC-PQ row reuses its (a, b) = a={_short(s.get("a"))}, b={_short(s.get("b"))}.']
  lines += ['', 'Where each method\'s choices come from ([paper], [code]: the authors\'; [ours]: this toolkit\'s):']
  for name, provenance in c.get('provenance', {}).items():
    lines += ['', f'{name}:'] + [f'- {p}' for p in provenance]
  return '\n'.join(lines) + '\n'


def _short(values) -> str:
  return '[' + ', '.join(f'{v:.2f}' for v in values) + ']' if values else '-'


def plot_pareto(comparison: Mapping[str, Any], path: str) -> None:
  """Test accuracy against BOPs compression (log axis), one line per row of the comparison; rows whose
  weights are sparse also at their sparse-BOPs ratio (hollow markers, dotted); seeds as error bars."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  rows = [r for r in comparison['rows'] if r['status'] == 'done' and r['test_accuracy']]
  for i, label in enumerate(dict.fromkeys(r['label'] for r in rows)):
    mine = sorted((r for r in rows if r['label'] == label), key=lambda r: r['bops_compression'])
    y = [100 * r['test_accuracy']['mean'] for r in mine]
    err = [100 * r['test_accuracy']['std'] for r in mine]
    ax.errorbar([r['bops_compression'] for r in mine], y, yerr=err, color=f'C{i}', marker='o', label=label,
                capsize=3)
    sparse = [r['sparse_bops_compression'] for r in mine]
    if any(s > 1.001 * r['bops_compression'] for s, r in zip(sparse, mine)):
      ax.plot(sparse, y, color=f'C{i}', marker='o', markerfacecolor='none', linestyle=':',
              label=f'{label} (sparse BOPs)')
  ax.axhline(100 * comparison['baseline']['test_accuracy'], color='0.5', linestyle='--', linewidth=1,
             label='dense baseline')
  ax.set_xscale('log')
  ax.set_xlabel('BOPs compression against dense FP32 (x, log)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'{comparison["arch"]} on {comparison["dataset"]}: accuracy against BOPs')
  ax.legend(fontsize=7)
  _save(fig, path)

if __name__ == '__main__':
  # python -m picpq_jax.report RUNS_DIR: the accuracy-compression plot of every run under RUNS_DIR.
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) != 2:
    sys.exit('usage: python -m picpq_jax.report RUNS_DIR')
  try:
    shown = plot_tradeoff(sys.argv[1])
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(f'{len(shown)} run(s) plotted in {os.path.join(sys.argv[1], "tradeoff.png")}')
