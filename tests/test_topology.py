"""The prunable-layer table agrees with the initialized Flax params of every architecture."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from picpq_jax import models, topology
from picpq_jax.models.layers import MaskedQConv


def param_shapes(arch, classes, size, channels):
  model = models.create_model(arch, classes, size, channels)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
  return shapes['params']


def conv_output_sizes(arch, classes, size, channels):
  """Spatial output size of every conv in the order the convs run, recorded during a real forward pass."""
  model = models.create_model(arch, classes, size, channels)
  x = jnp.zeros((1, size, size, channels))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  calls = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, MaskedQConv) and context.method_name == '__call__':
      calls[context.module.name] = out.shape[1:3]
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, x), variables)
  return calls


ARCH_SHAPES = [('resnet20', 10, 32, 3), ('resnet56', 10, 32, 3), ('resnet110', 100, 32, 3),
               ('vgg16', 10, 32, 3), ('mobilenetv2', 100, 32, 3), ('resnet18', 1000, 224, 3),
               ('resnet50', 1000, 224, 3), ('resnet20', 10, 32, 1)]


@pytest.mark.parametrize('arch,classes,size,channels', ARCH_SHAPES)
def test_topology_matches_initialized_params(arch, classes, size, channels):
  topo = topology.get_topology(arch, classes, size, channels)
  params = param_shapes(arch, classes, size, channels)
  sizes = conv_output_sizes(arch, classes, size, channels)
  conv_names = {k for k, v in params.items() if 'kernel' in v and len(v['kernel'].shape) == 4}
  assert set(topo.names) == conv_names  # every conv is in the table, nothing else
  assert list(sizes) == list(topo.names)  # forward (execution) order = the order convs run
  for layer in topo.layers:
    k, k2, cin_per_group, cout = params[layer.name]['kernel'].shape
    assert (k, k2) == (layer.kernel, layer.kernel)
    assert cout == layer.out_channels
    assert cin_per_group * layer.groups == layer.in_channels
    source_channels = channels if layer.source is None else topo.layer(layer.source).out_channels
    assert layer.in_channels == source_channels
    assert sizes[layer.name] == (layer.out_height, layer.out_width)
    for consumer in layer.consumers:
      assert consumer in params
  first_dense = params['fc1' if arch == 'vgg16' else 'classifier']
  assert first_dense['kernel'].shape == (topo.layer(topo.head_source).out_channels, topo.head_out_features)


def test_resnet56_table():
  topo = topology.get_topology('resnet56', 10, 32, 3)
  assert topo.num_layers == 55
  names = topo.names
  assert names[:5] == ('stem', 'layer1_0_conv1', 'layer1_0_conv2', 'layer1_1_conv1', 'layer1_1_conv2')
  chains = topo.chains
  assert len(chains) == 1
  (members,) = chains.values()
  assert len(members) == 28
  assert set(members) == {'stem'} | {n for n in names if n.endswith('conv2')}
  assert max(topo.layer(m).out_channels for m in members) == 64
  assert all(topo.layer(n).chain is None for n in names if n.endswith('conv1'))
  assert [topo.layer(n).b_max for n in ('stem', 'layer1_0_conv1', 'layer2_3_conv2', 'layer3_8_conv1')] == [
      32, 8, 6, 4]
  assert topo.layer('layer3_8_conv2').consumers == ('classifier',)


def test_imagenet_resnet_chains_follow_projections():
  topo = topology.get_topology('resnet50', 1000, 224, 3)
  chains = topo.chains
  assert len(chains) == 4  # one per stage: projection + every block's last conv
  stage2 = next(v for v in chains.values() if 'layer2_0_downsample' in v)
  assert set(stage2) == {'layer2_0_downsample'} | {f'layer2_{b}_conv3' for b in range(4)}
  assert topo.layer('stem').chain is None  # ResNet-50's first stage has a projection
  r18 = topology.get_topology('resnet18', 1000, 224, 3)
  assert set(r18.chains['stem']) == {'stem', 'layer1_0_conv2', 'layer1_1_conv2'}


def test_mobilenetv2_chains():
  topo = topology.get_topology('mobilenetv2', 100, 32, 3)
  assert topo.layer('block0_dw').chain == topo.layer('stem').chain  # t = 1: dw shares the stem's mask
  assert topo.layer('block1_dw').chain == topo.layer('block1_expand').chain
  # (6, 24, 2, 1): block 2 adds its input, so block 1 and 2 projections are one chain; block 1 is no residual
  assert topo.layer('block1_project').chain == topo.layer('block2_project').chain
  assert topo.layer('block0_project').chain is None


def test_the_topology_is_derived_from_the_spec_once():
  """One path from a spec to its topology: cached per spec, the B_max override applied there, and the head
  (which cost.params reads) taken from the spec's dense layers."""
  spec = models.get_spec('vgg16', 10, 32, 3)
  topo = topology.topology_from_spec(spec)
  assert topology.topology_from_spec(models.get_spec('vgg16', 10, 32, 3)) is topo
  assert topo == topology.get_topology('vgg16', 10, 32, 3)
  assert topo.head == spec.head and topo.head[0].source == topo.head_source
  b_max = [32] + [4] * (topo.num_layers - 1)
  overridden = topology.topology_from_spec(spec, b_max)
  assert list(overridden.b_max) == b_max and overridden == topology.get_topology('vgg16', 10, 32, 3, b_max)
  assert topology.topology_from_spec(spec) is topo  # the override did not touch the cached table
  with pytest.raises(ValueError, match='search.b_max'):
    topology.topology_from_spec(spec, [4])
