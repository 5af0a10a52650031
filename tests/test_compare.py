"""compare.py: the runs a comparison config plans, its checks before any work, PIC-PQ's BOPs target, and the
whole path on a tiny config (one baseline, a shared search, reuse, a failed setting, resumption)."""
import functools
import json
import os

import numpy as np
import pytest

from configs import compare_mnist5k
from picpq_jax import compare, pipeline, topology
from picpq_jax.methods import picpq
from picpq_jax.testing import random_variables
from picpq_jax import models
from tests.test_training import tiny_config


def comparison_config(rows, order=None):
  c = compare_mnist5k.get_config()
  c.compare.rows = type(c.compare.rows)(rows, allow_dotted_keys=True)
  c.compare.order = tuple(order or rows)
  return c


def test_plan_runs_reuses_one_search_and_applies_settings(tmp_path):
  c = compare_mnist5k.get_config()
  runs = compare.plan_runs(c, str(tmp_path))
  assert [r.row for r in runs][::3] == list(c.compare.order)
  searched = [r for r in runs if r.row == 'picpq']
  assert [r.config.search.bops_ratio for r in searched] == [30.0, 60.0, 120.0]
  assert all(r.config.search.ranking == 'reuse' and
             r.config.search.ranking_workdir == os.path.join(str(tmp_path), compare.SEARCH_DIR) for r in searched)
  assert {r.config.search.ranking for r in runs if r.row == 'picpq_identity'} == {'identity'}
  codeq = [r for r in runs if r.row == 'codeq']
  assert [r.config.codeq.groups.dead_zone.weight_decay for r in codeq] == [1.0, 2.5, 5.0]
  assert all(r.config.method.name == 'codeq' and not r.config.finetune.enabled for r in codeq)
  assert len({r.workdir for r in runs}) == len(runs)
  # The shared search runs at the FLOPs target, with its own ranking.
  s = compare.search_config(c, runs).search
  assert (s.ranking, s.bops_ratio, s.keep_fraction) == ('search', 0.0, c.search.keep_fraction)


@pytest.mark.parametrize('rows, match', [
    ({'x': {'method': 'pruneit', 'settings': ({},)}}, r"compare.rows.x.method='pruneit' is not a registered"),
    ({'x': {'method': 'picpq', 'settings': ({'codeq.epochs': 2},)}}, r"codeq.epochs is a setting of method 'codeq'"),
    ({'x': {'method': 'uniform', 'settings': ({'finetune.fp_epochs': 2},)}}, r"outside 'uniform'"),
    ({'x': {'method': 'uniform', 'settings': ({'uniform.keep': 0.5},)}}, r"'uniform.keep' is not a setting"),
    ({'x': {'method': 'uniform', 'settings': ({'uniform.bits': 0},)}}, r'settings\[0\]: uniform.bits=0'),
    ({'x': {'method': 'uniform', 'settings': ()}}, r'compare.rows.x.settings is empty'),
])
def test_bad_rows_one_sentence_before_any_work(tmp_path, rows, match):
  with pytest.raises(ValueError, match=match) as e:
    compare.check_comparison(comparison_config(rows), str(tmp_path))
  assert '\n' not in str(e.value)
  assert os.listdir(tmp_path) == []


def test_baseline_of_another_model_and_bad_seeds(tmp_path):
  c = comparison_config({'u': {'method': 'uniform', 'settings': ({},)}})
  (tmp_path / compare.BASELINE_DIR).mkdir()
  (tmp_path / compare.BASELINE_DIR / 'baseline.json').write_text(json.dumps({'arch': 'resnet56',
                                                                               'dataset': 'mnist5k'}))
  with pytest.raises(ValueError, match=r"baseline of arch 'resnet56', but the config asks for 'resnet20'"):
    compare.check_comparison(c, str(tmp_path))
  c.compare.seeds = 0
  with pytest.raises(ValueError, match=r'compare.seeds=0 must be a positive integer'):
    compare.check_comparison(c, str(tmp_path / 'fresh'))


def test_seed_statistics_known_answer():
  s = compare.seed_statistics([0.90, 0.92, 0.94])
  assert s['mean'] == pytest.approx(0.92) and s['std'] == pytest.approx(0.02) and s['n'] == 3
  assert compare.seed_statistics([0.5])['std'] == 0.0


def test_keep_fraction_grid():
  assert picpq.keep_fraction_grid(0.25) == [1.0, 0.75, 0.5, 0.25]
  assert picpq.keep_fraction_grid(0.01)[-1] == 0.01 and len(picpq.keep_fraction_grid(0.01)) == 100


@pytest.fixture(scope='module')
def resnet20_policy_at():
  c = tiny_config()
  spec = models.get_spec('resnet20', 10, 32, 1)
  topo = topology.get_topology('resnet20', 10, 32, 1)
  params = random_variables(spec)['params']
  rng = np.random.default_rng(0)
  fp = {l.name: rng.random(l.out_channels).astype(np.float32) for l in topo.layers}
  ones, zeros = np.ones(topo.num_layers), np.zeros(topo.num_layers)
  return functools.partial(picpq.policy_at_keep_fraction, c, topo, params, fp, ones, zeros)


@pytest.mark.parametrize('target', [30.0, 80.0])
def test_bops_target_reached_and_one_step_finer_is_not(resnet20_policy_at, target):
  step = 0.02
  policy = picpq.keep_fraction_for_bops(resnet20_policy_at, target, step)
  keep = policy.settings['keep_fraction']
  assert policy.summary['bops_compression'] >= target
  # Every larger fraction on the grid (the one a step finer first of all) falls short.
  for larger in picpq.keep_fraction_grid(step):
    if larger > keep:
      assert resnet20_policy_at(larger).summary['bops_compression'] < target, larger


def test_bops_target_out_of_reach_one_sentence(resnet20_policy_at):
  with pytest.raises(ValueError, match=r'search.bops_ratio=1000000.0 is out of reach'):
    picpq.keep_fraction_for_bops(resnet20_policy_at, 1e6, 0.05)


def test_reused_ranking_of_another_model(tmp_path):
  (tmp_path / picpq.SEARCH_RESULT).write_text(json.dumps({'arch': 'resnet56', 'a': [1.0] * 55, 'b': [0.0] * 55}))
  with pytest.raises(ValueError, match=r'holds the search of a resnet56'):
    picpq.reused_ranking(str(tmp_path), 'resnet20', 19)
  with pytest.raises(FileNotFoundError, match=r'holds no search.json'):
    picpq.reused_ranking(str(tmp_path / 'nothing'), 'resnet20', 19)


@pytest.mark.slow
def test_comparison_end_to_end_resumes_and_reports_failures(tmp_path):
  c = tiny_config()
  c.model.arch = 'resnet8'  # the whole path, at a third of ResNet-20's compile time
  c.train.epochs = 1
  c.search.population, c.search.tournament, c.search.total_evaluations, c.search.tau = 2, 2, 2, 0
  c.search.calibration_batches = 1
  c.finetune.fp_epochs, c.finetune.act_epochs, c.finetune.weight_act_epochs = 0, 0, 1
  c.finetune.eval_batch_size = 100
  c.finetune.precise_bn_batches = 1
  c.export.check_images = 0
  full = comparison_config({
      'picpq': {'method': 'picpq', 'label': 'PIC-PQ', 'settings': ({'search.bops_ratio': 30.0},
                                                                   {'search.bops_ratio': 1e6})},
      # No fine-tuning here (to keep the test short): the row has costs but no accuracy.
      'identity': {'method': 'picpq', 'label': 'identity',
                   'base': {'search.ranking': 'identity', 'finetune.enabled': False},
                   'settings': ({'search.bops_ratio': 30.0},)},
  })
  c.compare = full.compare
  workdir = str(tmp_path)
  out = compare.compare(c, workdir)
  rows = out['rows']
  assert [r['status'] for r in rows] == ['done', 'failed', 'done']
  assert 'search.bops_ratio=1000000.0 is out of reach' in rows[1]['error']
  assert rows[0]['bops_compression'] >= 30.0 and rows[2]['bops_compression'] >= 30.0
  summary = json.load(open(os.path.join(rows[0]['workdir'], 'summary.json')))
  assert rows[0]['test_accuracy']['mean'] == summary['compressed_test_accuracy']
  assert rows[2]['test_accuracy'] is None
  # Both PIC-PQ rows ranked with the one search's (a, b); the identity row with a = 1, b = 0.
  found = json.load(open(tmp_path / compare.SEARCH_DIR / 'search.json'))
  reused = json.load(open(os.path.join(rows[0]['workdir'], 'search.json')))
  assert reused['a'] == found['a'] and reused['b'] == found['b']
  assert set(json.load(open(os.path.join(rows[2]['workdir'], 'search.json')))['a']) == {1.0}
  for name in (compare.COMPARISON_JSON, compare.COMPARISON_MD, compare.PARETO_PNG):
    assert (tmp_path / name).stat().st_size > 0
  assert 'failed: ValueError' in (tmp_path / compare.COMPARISON_MD).read_text()
  # Run again: every finished stage is loaded, nothing is trained again.
  finished = os.path.join(rows[0]['workdir'], pipeline.FINETUNE)
  before = os.stat(finished).st_mtime_ns
  again = compare.compare(c, workdir)
  assert os.stat(finished).st_mtime_ns == before
  assert again['rows'][0]['test_accuracy'] == rows[0]['test_accuracy']


def test_seeds_repeat_the_finetuning_with_other_seeds_in_own_directories(tmp_path, monkeypatch):
  c = comparison_config({'u': {'method': 'uniform', 'settings': ({},)}})
  run = compare.plan_runs(c, str(tmp_path))[0]
  calls = []
  monkeypatch.setattr(pipeline, 'run_method', lambda config, workdir: ('result of', workdir))
  monkeypatch.setattr(pipeline, 'finetune', lambda config, workdir, topo, result: calls.append(
      (config.finetune.seed, pipeline.with_finetune_seed(config).seed, workdir, result)) or {'seed': len(calls)})
  out = compare.repeat_finetuning(run, str(tmp_path / compare.BASELINE_DIR), seeds=3)
  assert out == [{'seed': 1}, {'seed': 2}]
  assert [(s, t) for s, t, _, _ in calls] == [(c.seed + 1, c.seed + 1), (c.seed + 2, c.seed + 2)]
  assert [w for _, _, w, _ in calls] == [os.path.join(run.workdir, 'seed1'), os.path.join(run.workdir, 'seed2')]
  assert all(r == ('result of', run.workdir) for *_, r in calls)
  # Each seed directory links the one baseline.
  assert os.readlink(os.path.join(run.workdir, 'seed1', 'baseline.json')) == os.path.join(
      '..', '..', '..', '..', compare.BASELINE_DIR, 'baseline.json')
  assert compare.repeat_finetuning(run, str(tmp_path / compare.BASELINE_DIR), seeds=1) == []
