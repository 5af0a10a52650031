"""Every experiment config in configs/ is valid, and the paper's four follow the original's scripts.

Nothing is trained and no dataset is read: the topology needs only the dataset's classes and image shape,
which `data.DATASETS` holds (data.dataset_info would read the images to count the splits).
"""
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from picpq_jax import cli, data, models, pipeline, topology
from picpq_jax.methods import picpq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if os.path.basename(p) not in ('__init__.py', 'common.py'))


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def offline_info(config) -> data.DatasetInfo:
  """The dataset facts the topology reads, without the images (split sizes: the config's, nominal)."""
  spec = data.DATASETS[config.data.name]
  return data.DatasetInfo(config.data.name, spec.num_classes, config.data.image_size, spec.in_channels,
                          num_train=1, num_val=config.data.val_size, num_test=1)


def test_every_config_file_is_found():
  assert {'resnet56_cifar10', 'vgg16_cifar10', 'mobilenetv2_cifar100', 'resnet56_cifar100',
          'demo_mnist5k'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_a_model_and_passes_validation(name):
  config = load(name)
  assert config.search.b_max is None  # every shipped config uses its architecture's own list
  cli.check_config(config)
  info = offline_info(config)
  topo = pipeline.build_topology(config, info)
  picpq.check_config(config, topo)
  # The table is the model's: one entry per conv of the spec, and the model maps images to class logits.
  spec = models.get_spec(config.model.arch, info.num_classes, info.image_size, info.in_channels)
  assert topo.names == tuple(c.name for c in spec.convs)
  model = models.Net(spec)
  x = jnp.zeros((1, info.image_size, info.image_size, info.in_channels))
  logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
  assert logits.shape == (1, info.num_classes)
  assert all(1 <= b <= 32 for b in topo.b_max.tolist())


# The original's per-layer lists, written as its scripts write them (qbw_upper; the channel lists from their
# commented-out ori_channel), so that a change in our layer order or count shows here.
RESNET56_B_MAX = [32] + [8] * 18 + [6] * 18 + [4] * 18  # resnet_main.py, resnet_ch_main.py
VGG16_B_MAX = [32] + [8] * 3 + [6] * 3 + [4] * 6  # vgg_main.py
MOBILENETV2_B_MAX = [32] + [6] * 17 + [4] * 30 + [3] * 3 + [32]  # mbv2_ch_main.py
RESNET56_CHANNELS = [16] * 19 + [32] * 18 + [64] * 18
VGG16_CHANNELS = [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
MOBILENETV2_CHANNELS = ([32] * 2 + [16] + [96] * 2 + [24] + [144] * 2 + [24] + [144] * 2 + [32] + [192] * 2 + [32]
                        + [192] * 2 + [32] + [192] * 2 + [64] + [384] * 2 + [64] + [384] * 2 + [64] + [384] * 2
                        + [64] + [384] * 2 + [96] + [576] * 2 + [96] + [576] * 2 + [96] + [576] * 2 + [160]
                        + [960] * 2 + [160] + [960] * 2 + [160] + [960] * 2 + [320] + [1280])

# name -> (dataset, arch, keep_fraction, tau, search batch, (fp, act, weight_act) epochs, finetune batch,
#          B_max, out_channels in forward order)
PAPER = {
    # resnet_main.py: prune_away 55, tau_hat 200, long_ft 400, epoch_qt 400
    'resnet56_cifar10': ('cifar10', 'resnet56', 0.45, 200, 128, (400, 400, 400), 128, RESNET56_B_MAX,
                         RESNET56_CHANNELS),
    # vgg_main.py: prune_away 65.3, tau_hat 200, long_ft 160, epoch_qt 400
    'vgg16_cifar10': ('cifar10', 'vgg16', 0.347, 200, 128, (160, 400, 400), 128, VGG16_B_MAX, VGG16_CHANNELS),
    # mbv2_ch_main.py: prune_away 50, tau_hat 200, batch_size 64, long_ft 200, epoch_qt 400
    'mobilenetv2_cifar100': ('cifar100', 'mobilenetv2', 0.5, 200, 64, (200, 400, 400), 64, MOBILENETV2_B_MAX,
                             MOBILENETV2_CHANNELS),
    # resnet_ch_main.py: prune_away 30, tau_hat 50, long_ft 60, epoch_qt 400
    'resnet56_cifar100': ('cifar100', 'resnet56', 0.7, 50, 128, (60, 400, 400), 128, RESNET56_B_MAX,
                          RESNET56_CHANNELS),
}


@pytest.mark.parametrize('name', sorted(PAPER))
def test_paper_configs_follow_the_original_scripts(name):
  dataset, arch, keep, tau, search_batch, epochs, finetune_batch, b_max, channels = PAPER[name]
  config = load(name)
  assert (config.data.name, config.model.arch) == (dataset, arch)
  assert config.search.keep_fraction == keep
  assert config.search.tau == tau
  assert config.search.batch_size == search_batch
  ft = config.finetune
  assert (ft.fp_epochs, ft.act_epochs, ft.weight_act_epochs) == epochs
  assert ft.batch_size == finetune_batch
  # The original's shared settings: SGD lr 0.01, momentum 0.9, weight decay 5e-4; safeguard 0.1; lambda 1/6.
  assert (config.search.learning_rate, config.search.momentum, config.search.weight_decay) == (0.01, 0.9, 5e-4)
  assert (ft.learning_rate, ft.momentum, ft.weight_decay, ft.nesterov) == (0.01, 0.9, 5e-4, True)
  assert config.search.safeguard == 0.1 and config.search.bit_penalty == 1 / 6
  topo = pipeline.build_topology(config, offline_info(config))
  assert topo.out_channels.tolist() == channels  # our layer order is the original's
  assert topo.b_max.tolist() == b_max


def test_our_b_max_where_the_original_has_none():
  """ResNet-20/110 follow ResNet-56's per-stage rule; the ImageNet ResNets are ours (32, then 8/8/6/4)."""
  assert topology.get_topology('resnet20', 10, 32, 3).b_max.tolist() == [32] + [8] * 6 + [6] * 6 + [4] * 6
  assert topology.get_topology('resnet110', 10, 32, 3).b_max.tolist() == [32] + [8] * 36 + [6] * 36 + [4] * 36
  # ResNet-18: stem, 4 convs per stage, plus the projection of stages 2-4.
  assert topology.get_topology('resnet18', 1000, 224, 3).b_max.tolist() == [32] + [8] * 4 + [8] * 5 + [6] * 5 + [
      4] * 5


def test_search_b_max_replaces_the_architecture_list():
  config = load('vgg16_cifar10')
  own = pipeline.build_topology(config, offline_info(config))
  config.search.b_max = [32, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2]
  assert config.search.b_max == (32, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2)  # a tuple field (command-line form)
  topo = pipeline.build_topology(config, offline_info(config))
  assert topo.b_max.tolist() == [32, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2]
  assert own.b_max.tolist() == VGG16_B_MAX
  # Everything else about the table is unchanged.
  assert [l.out_channels for l in topo.layers] == [l.out_channels for l in own.layers]
  picpq.check_config(config, topo)


def one_sentence(message):
  return '\n' not in message and message.endswith('.')


@pytest.mark.parametrize('name,entries', [('vgg16_cifar10', 52), ('mobilenetv2_cifar100', 13),
                                          ('resnet56_cifar10', 54)])
def test_wrong_length_b_max_names_key_and_layer_count(name, entries):
  config = load(name)
  arch_topo = pipeline.build_topology(config, offline_info(config))
  count = arch_topo.num_layers
  config.search.b_max = [4] * entries
  pattern = rf'search\.b_max has {entries} entries but {config.model.arch} has {count} prunable convs'
  with pytest.raises(ValueError, match=pattern) as where_applied:  # where it is applied
    pipeline.build_topology(config, offline_info(config))
  with pytest.raises(ValueError, match=pattern) as where_validated:  # and in the search-config check
    picpq.check_config(config, arch_topo)
  assert one_sentence(str(where_applied.value)) and one_sentence(str(where_validated.value))


@pytest.mark.parametrize('bad', [33, 0, 4.5, True])
def test_b_max_entries_must_be_integers_in_1_to_32(bad):
  config = load('vgg16_cifar10')
  config.search.b_max = VGG16_B_MAX[:5] + [bad] + VGG16_B_MAX[6:]
  with pytest.raises(ValueError, match=rf"search\.b_max\[5\]={bad!r} \(layer 'conv5'\).*vgg16 has 13 "):
    pipeline.build_topology(config, offline_info(config))


@pytest.mark.parametrize('key,value', [('keep_fraction', 0.0), ('keep_fraction', 1.5), ('tau', -1)])
def test_bad_keep_fraction_or_tau_names_key_value_and_layer_count(key, value):
  config = load('resnet56_cifar100')
  topo = pipeline.build_topology(config, offline_info(config))
  config.search[key] = value
  with pytest.raises(ValueError, match=rf'search\.{key}={value!r} .*resnet56 \(55 prunable convs\)') as e:
    picpq.check_config(config, topo)
  assert one_sentence(str(e.value))
