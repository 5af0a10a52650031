"""Model zoo: a masked model computes what the physically slimmed model computes; masks/bits plumbing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import export, models, topology
from picpq_jax.testing import random_masks, random_variables


@pytest.mark.parametrize('arch,size,channels', [('resnet20', 16, 3), ('mobilenetv2', 16, 3), ('resnet18', 32, 2)])
def test_masked_model_equals_slimmed_model(arch, size, channels):
  spec = models.get_spec(arch, 7, size, channels)
  topo = topology.topology_from_spec(spec)
  model = models.Net(spec)
  variables = random_variables(spec)
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
  variables = random_variables(spec)
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 1))
  apply = jax.jit(lambda masks, bits: model.apply(variables, x, masks=masks, bits=bits))
  dense = apply(None, None)
  ones = {c.name: jnp.ones(c.out_channels) for c in spec.convs}
  full = {c.name: jnp.array([32, 32]) for c in spec.convs}
  # Equal up to float32 rounding, which scales with the logits (~20 with these random variables).
  np.testing.assert_allclose(apply(ones, full), dense, atol=1e-6 * float(np.abs(dense).max()))
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
