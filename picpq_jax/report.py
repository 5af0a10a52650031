"""What a run reports: the compression numbers, the per-layer table, and the plots people look at."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from picpq_jax import checkpoints, cost
from picpq_jax.topology import Topology

FP32 = 32


def compression_summary(topo: Topology, masks: Mapping[str, Any], bits: Mapping[str, int]) -> dict:
  """FLOPs (MACs), params and BOPs of the dense FP32 model and of the compressed one, with the ratios."""
  dense = cost.dense_keep(topo).astype(np.float32)
  keep = np.asarray(cost.keep_counts(topo, masks))
  w = np.array([bits.get(n, FP32) for n in topo.names], np.float32)
  full = np.full(topo.num_layers, FP32, np.float32)
  out = {
      'flops_dense': float(cost.flops(topo, dense)), 'flops': float(cost.flops(topo, keep)),
      'params_dense': float(cost.params(topo, dense)), 'params': float(cost.params(topo, keep)),
      'bops_dense': float(cost.bops(topo, dense, full, full)), 'bops': float(cost.bops(topo, keep, w, w)),
      'bops_pruned_fp32': float(cost.bops(topo, keep, full, full)),
  }
  out['flops_kept_fraction'] = out['flops'] / out['flops_dense']
  out['params_kept_fraction'] = out['params'] / out['params_dense']
  out['bops_compression'] = out['bops_dense'] / out['bops']
  return out


def layer_rows(topo: Topology, masks: Mapping[str, Any], bits: Mapping[str, int]) -> list[dict]:
  keep = np.asarray(cost.keep_counts(topo, masks))
  return [{'layer': l.name, 'channels': l.out_channels, 'kept': int(k), 'bits': int(bits.get(l.name, FP32)),
           'chain': l.chain or ''} for l, k in zip(topo.layers, keep)]


def policy_table(topo: Topology, masks: Mapping[str, Any], bits: Mapping[str, int]) -> str:
  """A plain-text table: kept channels and bits per layer, then FLOPs and BOPs before and after."""
  lines = [f'{"layer":<22} {"kept":>9} {"bits":>4}  chain']
  for r in layer_rows(topo, masks, bits):
    lines.append(f'{r["layer"]:<22} {r["kept"]:>4}/{r["channels"]:<4} {r["bits"]:>4}  {r["chain"]}')
  s = compression_summary(topo, masks, bits)
  lines += [
      f'FLOPs (MACs): {s["flops_dense"] / 1e6:.2f} M -> {s["flops"] / 1e6:.2f} M '
      f'({100 * s["flops_kept_fraction"]:.1f} % kept)',
      f'params:       {s["params_dense"] / 1e6:.3f} M -> {s["params"] / 1e6:.3f} M',
      f'BOPs:         {s["bops_dense"] / 1e9:.2f} G -> {s["bops"] / 1e9:.3f} G '
      f'(compression {s["bops_compression"]:.2f}x against dense FP32)',
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
  bottom.bar(x, [r['bits'] for r in rows], color='C2')
  bottom.set_ylabel('bits (weights = activations)')
  bottom.set_xticks(x, [r['layer'] for r in rows], rotation=90, fontsize=6)
  _save(fig, path)


def run_summary(workdir: str, topo: Topology, baseline: dict, policy: dict, found: dict,
                tuned: Optional[dict], exported: Optional[dict] = None) -> dict:
  """The numbers of one run (what the field reports), as a dict; `write_run_report` saves it."""
  from picpq_jax import pipeline  # pylint: disable=g-import-not-at-top
  masks, bits = pipeline.policy_arrays(policy)
  s = compression_summary(topo, masks, bits)
  out = {
      'arch': policy['arch'], 'dataset': policy['dataset'], 'workdir': os.path.abspath(workdir),
      'baseline_test_accuracy': baseline['test']['accuracy'],
      'compressed_test_accuracy': tuned['test']['accuracy'] if tuned else None,
      **s,
      'layers': layer_rows(topo, masks, bits),
      'wall_time_s': {'baseline': baseline.get('wall_time_s'), 'search': found.get('wall_time_s'),
                      **({k: v['wall_time_s'] for k, v in tuned['stages'].items()} if tuned else {})},
      'search_best_loss': found.get('best_loss'), 'search_evaluations': found.get('evaluations'),
      'search_distinct_plans': found.get('distinct_plans'),
      'search_evaluations_saved': found.get('evaluations_saved'),
      'export': exported,
  }
  if tuned:
    out['accuracy_drop'] = out['baseline_test_accuracy'] - out['compressed_test_accuracy']
  return out


def markdown(summary: dict) -> str:
  s = summary
  acc = lambda v: '-' if v is None else f'{100 * v:.2f} %'  # noqa: E731
  lines = [
      f'# {s["arch"]} on {s["dataset"]}', '',
      '| | dense FP32 | compressed | ratio |', '|---|---|---|---|',
      f'| test accuracy | {acc(s["baseline_test_accuracy"])} | {acc(s["compressed_test_accuracy"])} | '
      f'drop {acc(s.get("accuracy_drop"))} |',
      f'| FLOPs (MACs) | {s["flops_dense"] / 1e6:.2f} M | {s["flops"] / 1e6:.2f} M | '
      f'{s["flops_dense"] / s["flops"]:.2f}x |',
      f'| params | {s["params_dense"] / 1e6:.3f} M | {s["params"] / 1e6:.3f} M | '
      f'{s["params_dense"] / s["params"]:.2f}x |',
      f'| BOPs | {s["bops_dense"] / 1e9:.2f} G | {s["bops"] / 1e9:.3f} G | {s["bops_compression"]:.2f}x |',
      '', '| layer | kept | bits | chain |', '|---|---|---|---|',
  ]
  lines += [f'| {r["layer"]} | {r["kept"]}/{r["channels"]} | {r["bits"]} | {r["chain"]} |' for r in s['layers']]
  e = s.get('export')
  if e:
    lines += ['', '| export (slimmed, integer codes) | dense FP32 | file | ratio |', '|---|---|---|---|',
              f'| bytes | {e["dense_fp32_bytes"]:,} | {e["export_bytes"]:,} | {e["ratio"]:.2f}x |']
    if e.get('checked_images'):
      lines += ['', f'The loaded export\'s logits differ from the masked, fake-quantized model\'s by at most '
                    f'{e["max_logit_difference"]:.2e} on {e["checked_images"]} test images.']
  if s.get('search_evaluations') is not None:
    lines += ['', f'Search: {s["search_evaluations"]} candidates, {s.get("search_distinct_plans")} distinct '
                  f'pruning plans; {s.get("search_evaluations_saved") or 0} evaluations saved by reusing the loss '
                  f'of an identical plan. Best validation loss {s["search_best_loss"]:.4f}.']
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
