"""Report numbers against the cost model's invariants; the Markdown table and the trade-off plot."""
import json

import numpy as np
import pytest

from picpq_jax import cost, report, topology
from picpq_jax import policy as policy_lib


def test_ledger_of_a_hand_policy():
  topo = topology.get_topology('resnet20', 10, 32, 1)
  masks = {'layer1_0_conv1': np.array([1.0] * 8 + [0.0] * 8)}
  bits = {l.name: 4 for l in topo.layers[1:]}
  s = cost.ledger(topo, policy_lib.from_masks_and_bits('resnet20', 'mnist5k', 'uniform', masks, bits))
  assert s['bops_dense'] == pytest.approx(1024 * s['flops_dense'])
  # Halving layer1_0_conv1 halves its MACs and the MACs of layer1_0_conv2, which reads it.
  l1, l2 = (topo.layer(n) for n in ('layer1_0_conv1', 'layer1_0_conv2'))
  saved = (l1.out_height * l1.out_width * 9 * 16 * 8) + (l2.out_height * l2.out_width * 9 * 8 * 16)
  assert s['flops_dense'] - s['flops'] == pytest.approx(saved)
  keep = np.asarray(cost.keep_counts(topo, masks))
  w = np.array([32] + [4] * (topo.num_layers - 1))
  assert s['bops'] == pytest.approx(float(cost.bops(topo, keep, w, w)))
  assert s['bops_compression'] == pytest.approx(s['bops_dense'] / s['bops'])
  # No weight-level masks: the sparse figures are the structured ones.
  assert s['sparse_bops'] == s['bops'] and s['conv_weight_sparsity'] == 0
  row = s['layers'][topo.index('layer1_0_conv1')]
  assert (row['kept'], row['weight_bits'], row['act_bits'], row['density']) == (8, 4, 4, 1.0)


def test_ledger_counts_weight_masks_only_under_sparse_columns():
  topo = topology.get_topology('resnet20', 10, 32, 1)
  layer = topo.layer('layer2_0_conv1')
  shape = (3, 3, layer.in_channels, layer.out_channels)
  half = np.zeros(shape, np.float32)
  half[..., : layer.out_channels // 2] = 1.0  # half of the kernel's entries live
  bits = {l.name: 8 for l in topo.layers[1:]}
  dense = policy_lib.from_masks_and_bits('resnet20', 'mnist5k', 'codeq', {}, bits)
  sparse = policy_lib.from_masks_and_bits('resnet20', 'mnist5k', 'codeq', {}, bits,
                                          weight_masks={layer.name: half})
  a, b = cost.ledger(topo, dense), cost.ledger(topo, sparse)
  assert b['bops'] == a['bops'] and b['flops'] == a['flops']  # structured figures ignore weight sparsity
  macs = layer.out_height * layer.out_width * 9 * layer.in_channels * layer.out_channels
  assert a['sparse_bops'] - b['sparse_bops'] == pytest.approx(macs / 2 * 8 * 8)
  assert a['weight_bits'] - b['weight_bits'] == pytest.approx(9 * layer.in_channels * layer.out_channels / 2 * 8)
  assert b['layers'][layer.index]['density'] == 0.5


def test_markdown_and_tradeoff_plot(tmp_path):
  topo = topology.get_topology('resnet20', 10, 32, 1)
  ledger = cost.ledger(topo, policy_lib.from_masks_and_bits('resnet20', 'mnist5k', 'picpq', {}, {}))
  base = {**ledger, 'arch': 'resnet20', 'dataset': 'mnist5k', 'baseline_test_accuracy': 0.98,
          'flops_dense': 4e7, 'flops': 2e7, 'params_dense': 2.7e5, 'params': 1e5, 'bops_dense': 4.1e10,
          'bops': 1e9, 'bops_compression': 41.0, 'wall_time_s': {'baseline': 12.0}}
  for i, (acc, ratio) in enumerate([(0.97, 41.0), (0.95, 60.0)]):
    run = tmp_path / f'run{i}'
    run.mkdir()
    summary = dict(base, compressed_test_accuracy=acc, bops_compression=ratio, accuracy_drop=0.98 - acc)
    (run / 'summary.json').write_text(json.dumps(summary))
  text = report.markdown(dict(base, compressed_test_accuracy=0.97, accuracy_drop=0.01))
  assert '| BOPs | 41.00 G | 1.000 G | 41.00x |' in text
  assert '| test accuracy | 98.00 % | 97.00 % | drop 1.00 % |' in text
  assert 'export' not in text
  exported = {'dense_fp32_bytes': 1077736, 'export_bytes': 50497, 'ratio': 1077736 / 50497, 'checked_images': 100,
              'max_logit_difference': 2.5e-6}
  text = report.markdown(dict(base, compressed_test_accuracy=0.97, accuracy_drop=0.01, export=exported))
  assert '| bytes | 1,077,736 | 50,497 | 21.34x |' in text
  assert 'at most 2.50e-06 on 100 test images' in text
  points = report.plot_tradeoff(str(tmp_path))
  assert sorted(p['bops_compression'] for p in points) == [41.0, 60.0]
  assert (tmp_path / 'tradeoff.png').stat().st_size > 1000
  with pytest.raises(ValueError, match='summary.json'):
    report.plot_tradeoff(str(tmp_path / 'run0' / 'nothing'))
