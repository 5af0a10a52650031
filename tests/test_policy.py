"""The Policy and the method interface: the file format round trip, old run directories, the registry,
PIC-PQ through the interface unchanged, and the uniform baseline against hand-worked answers."""
import json
import os

import numpy as np
import pytest

from picpq_jax import bits as bits_lib, cli, criteria, methods, pruning, topology
from picpq_jax import policy as policy_lib
from picpq_jax.methods import picpq, uniform
from picpq_jax.testing import random_masks, random_variables
from picpq_jax import models


def resnet20():
  return topology.get_topology('resnet20', 10, 32, 1)


def test_round_trip_keeps_everything(tmp_path):
  topo = resnet20()
  rng = np.random.default_rng(0)
  masks = random_masks(topo, rng)
  bits = {l.name: (int(rng.integers(2, 9)), int(rng.integers(2, 9))) for l in topo.layers}
  layer = topo.layer('layer2_0_conv1')
  weight_masks = {layer.name: (rng.random((3, 3, layer.in_channels, layer.out_channels)) < 0.3).astype(np.float32)}
  quantizers = {layer.name: {'name': 'codeq', 'step': 0.125, 'shift': 0.01}}
  policy = policy_lib.from_masks_and_bits('resnet20', 'mnist5k', 'codeq', masks, bits, {'decay': 1e-4},
                                          weight_masks, quantizers)
  policy_lib.write_policy(str(tmp_path), policy)
  assert sorted(os.listdir(tmp_path)) == ['policy.json', 'policy_weight_masks.npz']  # no temporary files left
  back = policy_lib.read_policy(str(tmp_path / 'policy.json'), 'resnet20')
  assert (back.arch, back.dataset, back.method, back.settings) == ('resnet20', 'mnist5k', 'codeq', {'decay': 1e-4})
  for name in topo.names:
    np.testing.assert_array_equal(back.layers[name].mask, masks[name])
    assert (back.layers[name].weight_bits, back.layers[name].act_bits) == bits[name]
  np.testing.assert_array_equal(back.weight_masks[layer.name], weight_masks[layer.name])
  assert back.layers[layer.name].quantizer == quantizers[layer.name]
  assert back.layers['stem'].quantizer == {'name': 'picpq'}


def test_format_1_policy_of_an_old_run_directory_loads(tmp_path):
  """policy.json as PIC-PQ wrote it before the method interface: masks and one bit-width per layer."""
  topo = resnet20()
  masks = random_masks(topo, np.random.default_rng(1))
  bits = {l.name: 32 if l.source is None else 4 for l in topo.layers}
  old = {'arch': 'resnet20', 'dataset': 'mnist5k', 'keep_fraction': 0.6,
         'masks': {k: v.astype(int).tolist() for k, v in masks.items()}, 'bits': bits, 'summary': {'bops': 1.0}}
  (tmp_path / 'policy.json').write_text(json.dumps(old))
  policy = policy_lib.read_policy(str(tmp_path / 'policy.json'), 'resnet20')
  assert policy.method == 'picpq' and policy.settings == {'keep_fraction': 0.6}
  for name in topo.names:
    np.testing.assert_array_equal(policy.masks[name], masks[name])
    assert policy.layers[name].weight_bits == policy.layers[name].act_bits == bits[name]
  args = policy_lib.model_arguments(policy)
  assert args['bits']['layer1_0_conv1'].tolist() == [4, 4] and args['bits']['stem'].tolist() == [32, 32]


@pytest.mark.parametrize('content, needle', [
    ({'format': 7, 'arch': 'resnet20'}, 'format 7'),
    ({'format': 2, 'arch': 'resnet20'}, 'not a readable policy'),
    ([1, 2, 3], 'not a readable policy'),
])
def test_unreadable_policies_are_one_sentence_naming_the_file(tmp_path, content, needle):
  path = tmp_path / 'policy.json'
  path.write_text(json.dumps(content))
  with pytest.raises(policy_lib.PolicyFormatError, match=needle) as info:
    policy_lib.read_policy(str(path))
  assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_policy_of_another_architecture_or_damaged_file(tmp_path):
  path = tmp_path / 'policy.json'
  policy_lib.write_policy(str(tmp_path), policy_lib.from_masks_and_bits('resnet56', 'cifar10', 'uniform', {}, {}))
  with pytest.raises(policy_lib.PolicyFormatError, match='policy for resnet56 but model.arch'):
    policy_lib.read_policy(str(path), 'resnet20')
  path.write_text('{"format": 2, "arch": ')
  with pytest.raises(ValueError, match='not valid JSON'):
    policy_lib.read_policy(str(path))


def test_registry_and_settings_of_another_method():
  assert set(methods.names()) >= {'picpq', 'uniform', 'codeq'}
  assert methods.get('uniform') is uniform
  with pytest.raises(ValueError, match=r"method.name='djpq2' is not a registered method"):
    methods.get('djpq2')
  assert methods.sections()['search'] == 'picpq' and methods.sections()['uniform'] == 'uniform'
  message = cli.other_method_setting('uniform', ['--config.search.population=8', '--config.train.epochs=1'])
  assert message.startswith("config.search.population is a setting of method 'picpq'")
  assert cli.other_method_setting('picpq', ['--config.search.population=8', '--config.uniform.bits=4']) \
      .startswith("config.uniform.bits is a setting of method 'uniform'")
  assert cli.other_method_setting('picpq', ['--config.search.population=8', '--config.finetune.fp_epochs=1']) is None


def test_picpq_policy_through_the_interface_equals_the_direct_computation(tmp_path):
  """PIC-PQ's policy is global_prune's masks and assign_bits' bits, as before the interface existed."""
  from configs import demo_mnist5k  # pylint: disable=g-import-not-at-top
  config = demo_mnist5k.get_config()
  spec = models.get_spec('resnet20', 10, 32, 1)
  topo = topology.topology_from_spec(spec)
  variables = random_variables(spec)
  rng = np.random.default_rng(2)
  fp = {l.name: rng.random(l.out_channels).astype(np.float32) for l in topo.layers}
  found = {'a': np.exp(rng.normal(size=topo.num_layers)).tolist(), 'b': rng.normal(size=topo.num_layers).tolist()}
  s = config.search
  masks, _ = pruning.global_prune(topo, fp, np.asarray(found['a']), np.asarray(found['b']), s.keep_fraction,
                                  s.safeguard, s.check_every)
  expected_bits = bits_lib.assign_bits(topo, variables['params'], {k: np.asarray(v) for k, v in masks.items()},
                                       None, s.bit_penalty, s.min_bits)
  policy = picpq.derive_policy(config, str(tmp_path), topo, variables, fp, found)
  again = policy_lib.read_policy(str(tmp_path / 'policy.json'), 'resnet20')  # what later stages read
  for p in (policy, again):
    assert p.method == 'picpq'
    for name in topo.names:
      np.testing.assert_array_equal(p.masks[name], np.asarray(masks[name]))
      assert p.layers[name].weight_bits == p.layers[name].act_bits == expected_bits[name]
  assert again.summary['bops'] == pytest.approx(policy.summary['bops'])


def test_uniform_keeps_the_largest_l1_channels_of_every_layer_and_respects_chains():
  spec = models.get_spec('resnet20', 10, 32, 1)
  topo = topology.topology_from_spec(spec)
  variables = random_variables(spec)
  l1 = criteria.filter_properties(models.Net(spec), variables, None, 'l1')
  masks = uniform.uniform_masks(topo, l1, 0.5)
  free = topo.layer('layer1_0_conv1')
  assert free.chain is None
  expected = np.zeros(free.out_channels)
  expected[np.argsort(-l1[free.name])[:round(0.5 * free.out_channels)]] = 1
  np.testing.assert_array_equal(masks[free.name], expected)
  for chain, members in topo.chains.items():
    width = max(topo.layer(m).out_channels for m in members)
    score = np.zeros(width)
    for m in members:
      score[:topo.layer(m).out_channels] += l1[m]
    top = np.zeros(width)
    top[np.argsort(-score)[:round(0.5 * width)]] = 1
    for m in members:
      np.testing.assert_array_equal(masks[m], top[:topo.layer(m).out_channels]), (chain, m)
  bits = uniform.uniform_bits(topo, 4)
  assert bits['stem'] == 32 and {bits[n] for n in topo.names[1:]} == {4}


@pytest.mark.parametrize('args, needle', [
    (['--config.method.name=djpq2'], "method.name='djpq2' is not a registered method"),
    (['--config.codeq.epochs=2'], "config.codeq.epochs is a setting of method 'codeq'"),
])
def test_entry_point_refuses_an_unknown_method_or_another_methods_setting(tmp_path, args, needle):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / 'run'
  out = subprocess.run([sys.executable, 'search.py', '--config', 'configs/demo_mnist5k.py', '--workdir',
                        str(workdir), *args], cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [out.stderr.strip()] and needle in out.stderr
  assert not workdir.exists()  # refused before any work
