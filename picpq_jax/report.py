"""What a run reports: the compression numbers, the per-layer table, and the plots people look at."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from picpq_jax import cost
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


def plot_search(history_loss: np.ndarray, path: str, title: str = '') -> None:
  """Loss of every evaluated candidate against the evaluation index, with the best-so-far curve."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  loss = np.asarray(history_loss, np.float64)
  x = np.arange(1, len(loss) + 1)
  best = np.fmin.accumulate(np.where(np.isfinite(loss), loss, np.inf))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.scatter(x, loss, s=8, alpha=0.5, label='candidate')
  ax.plot(x, np.where(np.isfinite(best), best, np.nan), color='C3', label='best so far')
  ax.set_xlabel('evaluation')
  ax.set_ylabel('validation cross-entropy after tau steps')
  ax.set_title(title or 'PIC-PQ search')
  ax.legend()
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
