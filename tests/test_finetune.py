"""Fine-tuning a policy: the stages run in order from each other's best checkpoint, pruned weights stay 0."""
import json

import numpy as np
import pytest

from picpq_jax import methods, pipeline, pruning, topology, training
from picpq_jax import policy as policy_lib
from picpq_jax.testing import random_masks
from tests.test_training import tiny_config


def test_stage_bits_and_model_arguments():
  masks = {'a': np.ones(3), 'b': np.array([1, 0, 1])}
  policy = policy_lib.from_masks_and_bits('resnet20', 'mnist5k', 'picpq', masks, {'a': 4, 'b': (2, 3)})
  args = lambda w, a: policy_lib.model_arguments(policy_lib.with_stage_bits(policy, w, a))  # noqa: E731
  assert args(False, False)['bits'] is None  # every layer at 32: the full-precision model, no quantizer
  act, both = args(False, True)['bits'], args(True, True)['bits']
  assert act['a'].tolist() == [32, 4] and act['b'].tolist() == [32, 3]
  assert both['a'].tolist() == [4, 4] and both['b'].tolist() == [2, 3]
  np.testing.assert_array_equal(args(True, True)['masks']['b'], [1, 0, 1])


def test_zero_pruned_weights_hand_example():
  topo = topology.get_topology('resnet20', 10, 32, 1)
  rng = np.random.default_rng(0)
  params = {l.name: {'kernel': rng.normal(size=(3, 3, l.in_channels, l.out_channels)).astype(np.float32),
                     'bn': {'scale': np.ones(l.out_channels), 'bias': np.ones(l.out_channels)}}
            for l in topo.layers}
  masks = random_masks(topo, rng)
  out = pruning.zero_pruned_weights(topo, params, masks)
  k = np.asarray(out['layer1_0_conv1']['kernel'])
  src, own = masks['stem'], masks['layer1_0_conv1']
  expected = params['layer1_0_conv1']['kernel'] * src[None, None, :, None] * own[None, None, None, :]
  np.testing.assert_array_equal(k, expected)
  np.testing.assert_array_equal(np.asarray(out['stem']['bn']['scale']), masks['stem'])


@pytest.mark.slow
def test_finetune_stages_keep_pruned_weights_zero(tmp_path):
  config = tiny_config()
  config.model.arch = 'resnet8'
  config.train.epochs = 1
  config.finetune.fp_epochs, config.finetune.act_epochs, config.finetune.weight_act_epochs = 1, 1, 2
  config.finetune.eval_batch_size = 100
  workdir = str(tmp_path)
  model, info = pipeline.build_model(config)
  topo = topology.get_topology('resnet8', 10, 32, 1)
  pipeline.train_baseline(config, workdir)
  masks = random_masks(topo, np.random.default_rng(1))
  bits = {l.name: (32 if l.source is None else 4) for l in topo.layers}
  policy = policy_lib.from_masks_and_bits('resnet8', 'mnist5k', 'picpq', masks, bits)
  result = methods.Result(policy=policy, model=model)
  tuned = pipeline.finetune(config, workdir, topo, result)
  assert list(tuned['stages']) == ['finetune_fp', 'finetune_act', 'finetune_weight_act']
  final = training.load_variables(workdir, 'finetune_weight_act', config, best=True)
  for layer in topo.layers:
    kernel = np.asarray(final['params'][layer.name]['kernel'])
    assert np.all(kernel[..., masks[layer.name] == 0] == 0), layer.name
    if layer.source is not None and not layer.depthwise:
      assert np.all(kernel[:, :, masks[layer.source] == 0, :] == 0), layer.name
  # The reported test accuracy is that of the last stage's best checkpoint with the policy applied.
  again = pipeline.evaluate_split(config, model, final, 'test', **policy_lib.model_arguments(policy))
  assert again['accuracy'] == pytest.approx(tuned['test']['accuracy'])
  rows = [json.loads(l) for l in open(tmp_path / 'finetune_weight_act.jsonl')]
  assert len(rows) == 2
  # The export of the fine-tuned model: its loaded, slimmed network gives the masked model's logits.
  config.export.check_images = 50
  exported = pipeline.export_run(config, workdir, result, tuned)
  assert exported['checked_images'] == 50 and exported['max_logit_difference'] <= 1e-4
  assert exported['export_bytes'] < exported['dense_fp32_bytes'] / 4


def test_finetune_needs_a_complete_run_directory(tmp_path):
  config = tiny_config()
  with pytest.raises(FileNotFoundError, match='policy.json'):
    pipeline.finetune_policy(config, str(tmp_path))
  (tmp_path / 'policy.json').write_text(json.dumps({'arch': 'resnet56', 'masks': {}, 'bits': {}}))
  with pytest.raises(ValueError, match='resnet56'):
    pipeline.finetune_policy(config, str(tmp_path))
  (tmp_path / 'policy.json').write_text(json.dumps({'arch': 'resnet20', 'masks': {}, 'bits': {}}))
  with pytest.raises(FileNotFoundError, match='no baseline'):
    pipeline.finetune_policy(config, str(tmp_path))
