"""Model zoo: a masked model computes what the physically slimmed model computes; masks/bits plumbing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import export, models, topology


def random_variables(model, key, shape):
  """Init, then randomize BN statistics and affine parameters so that masking errors cannot hide."""
  variables = model.init(key, jnp.zeros((1, *shape)), train=False)
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  out = []
  for k, (path, leaf) in zip(keys, jax.tree_util.tree_flatten_with_path(variables)[0]):
    name = jax.tree_util.keystr(path)
    if 'var' in name:
      leaf = jax.random.uniform(k, leaf.shape, minval=0.5, maxval=2.0)
    elif 'mean' in name or "'bias'" in name or 'scale' in name:
      leaf = leaf + 0.3 * jax.random.normal(k, leaf.shape)
    out.append(leaf)
  return jax.tree.unflatten(tree, out)


def random_masks(topo, rng, keep_prob=0.6):
  """One shared mask per chain (member of width n gets chain_mask[:n]); at least one channel kept."""
  chain_masks, masks = {}, {}
  for layer in topo.layers:
    if layer.chain is not None:
      width = max(topo.layer(m).out_channels for m in topo.chains[layer.chain])
      if layer.chain not in chain_masks:
        m = (rng.random(width) < keep_prob).astype(np.float32)
        m[0] = 1.0
        chain_masks[layer.chain] = m
      masks[layer.name] = chain_masks[layer.chain][:layer.out_channels]
    else:
      m = (rng.random(layer.out_channels) < keep_prob).astype(np.float32)
      m[rng.integers(layer.out_channels)] = 1.0
      masks[layer.name] = m
  return masks


@pytest.mark.parametrize('arch,size,channels', [('resnet20', 16, 3), ('mobilenetv2', 16, 3), ('resnet18', 32, 2)])
def test_masked_model_equals_slimmed_model(arch, size, channels):
  spec = models.get_spec(arch, 7, size, channels)
  topo = topology.topology_from_spec(spec)
  model = models.Net(spec)
  variables = random_variables(model, jax.random.key(0), (size, size, channels))
  masks = random_masks(topo, np.random.default_rng(0))
  x = jax.random.normal(jax.random.key(2), (3, size, size, channels))
  apply = jax.jit(lambda masks: model.apply(variables, x, train=False, masks=masks))
  masked_logits = apply({k: jnp.asarray(v) for k, v in masks.items()})

  keep = export.kept_indices(spec, masks)
  slim = export.slim_spec(spec, keep)
  slim_vars = export.slice_variables(spec, variables, keep)
  slim_logits = jax.jit(models.Net(slim).apply)(slim_vars, x)
  assert sum(c.out_channels for c in slim.convs) < sum(c.out_channels for c in spec.convs)
  np.testing.assert_allclose(slim_logits, masked_logits, atol=1e-5, rtol=1e-5)
  # and masking really changed the function
  dense_logits = apply(None)
  assert np.abs(np.asarray(dense_logits) - np.asarray(masked_logits)).max() > 1e-3


def test_no_masks_equals_all_ones_and_32_bits():
  spec = models.get_spec('resnet20', 10, 16, 1)
  model = models.Net(spec)
  variables = random_variables(model, jax.random.key(0), (16, 16, 1))
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 1))
  apply = jax.jit(lambda masks, bits: model.apply(variables, x, masks=masks, bits=bits))
  dense = apply(None, None)
  ones = {c.name: jnp.ones(c.out_channels) for c in spec.convs}
  full = {c.name: jnp.array([32, 32]) for c in spec.convs}
  np.testing.assert_allclose(apply(ones, full), dense, atol=1e-6)
  low = {c.name: jnp.array([4, 4]) for c in spec.convs[1:]}
  assert np.abs(np.asarray(apply(None, low)) - np.asarray(dense)).max() > 1e-3


def test_unknown_mask_or_bits_name_is_an_error():
  spec = models.get_spec('resnet20', 10, 16, 1)
  model = models.Net(spec)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match='layer1_0_conv9'):
    model.apply(variables, jnp.zeros((1, 16, 16, 1)), masks={'layer1_0_conv9': jnp.ones(16)})
  with pytest.raises(ValueError, match='nope'):
    model.apply(variables, jnp.zeros((1, 16, 16, 1)), bits={'nope': (4, 4)})


def test_unknown_architecture():
  with pytest.raises(ValueError, match='model.arch'):
    models.get_spec('resnet21', 10, 32, 3)


@pytest.mark.parametrize('arch,expected', [
    ('resnet20', 269_722), ('resnet56', 853_018),  # He et al.: 0.27 M, 0.85 M
    ('resnet18', 11_689_512), ('resnet50', 25_557_032),  # torchvision's published counts (1000 classes)
])
def test_parameter_counts_match_published(arch, expected):
  size, classes = (224, 1000) if arch in ('resnet18', 'resnet50') else (32, 10)
  model = models.create_model(arch, classes, size, 3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == expected
