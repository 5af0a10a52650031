"""Model zoo: a masked model computes what the physically slimmed model computes; masks/bits plumbing; where
the conv units tap the map the feature-map rank is taken from (intermediates['conv'])."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import criteria, export, models, topology
from picpq_jax.models.layers import BN_EPSILON, MaskedQConv
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


# --------------------------------------------------------------------------------------------------------
# The rank taps. The original's generate_rank.py hooks MobileNetV2's stem and last 1x1 conv at their ReLU6
# (features[0][2], features[18][2]) and every other conv, of every architecture, at the Conv2d output
# (before BatchNorm). The sown maps are compared with numpy computations from the variables and each unit's
# input.
# --------------------------------------------------------------------------------------------------------


def conv_same(x, kernel):
  """Stride-1 'same' convolution (cross-correlation, as lax and PyTorch compute it) in numpy float64:
  x (N, H, W, Cin), kernel (k, k, Cin, Cout) -> (N, H, W, Cout)."""
  k = kernel.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for di in range(k):
    for dj in range(k):
      out += xp[:, di:di + h, dj:dj + w, :] @ kernel[di, dj]
  return out


def batch_norm_eval(y, params, stats):
  return (y - stats['mean']) / np.sqrt(stats['var'] + BN_EPSILON) * params['scale'] + params['bias']


def sown_and_inputs(model, variables, x):
  """(sown maps by layer, each unit's input by layer) of one eval-mode forward pass."""
  inputs = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, MaskedQConv) and context.method_name == '__call__':
      inputs[context.module.name] = np.asarray(args[0], np.float64)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  sown = {k: np.asarray(v['conv'][0], np.float64) for k, v in state['intermediates'].items()}
  return sown, inputs


@pytest.fixture(scope='module')
def mobilenetv2():
  model = models.create_model('mobilenetv2', 10, 8, 3)
  variables = random_variables(model.spec, seed=1, spread=0.5)
  # Images of a few units: the stem's BatchNorm outputs then reach past both ends of ReLU6's [0, 6].
  x = 4.0 * np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  sown, inputs = sown_and_inputs(model, variables, jnp.asarray(x))
  return model, variables, x, sown, inputs


def test_only_mobilenetv2_stem_and_last_conv_are_tapped_after_the_activation():
  for arch in models.ARCHS:
    size = 224 if arch in ('resnet18', 'resnet50') else 32
    tapped = [c.name for c in models.get_spec(arch, 10, size, 3).convs if c.rank_after_activation]
    assert tapped == (['stem', 'last_conv'] if arch == 'mobilenetv2' else []), arch


def test_mobilenetv2_stem_and_last_conv_sow_their_relu6_output(mobilenetv2):
  model, variables, x, sown, inputs = mobilenetv2
  p, s = variables['params'], variables['batch_stats']
  f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
  p, s = f64(p), f64(s)
  stem = np.clip(batch_norm_eval(conv_same(x.astype(np.float64), p['stem']['kernel']), p['stem']['bn'],
                                 s['stem']['bn']), 0, 6)
  np.testing.assert_allclose(sown['stem'], stem, rtol=1e-4, atol=1e-4)
  # The clip really acted at both ends, so a pre-activation or plain-ReLU tap would differ.
  assert (stem == 0).sum() > 100 and (stem == 6).sum() > 10 and ((stem > 0) & (stem < 6)).sum() > 100
  last_in = inputs['last_conv']
  last = np.clip(batch_norm_eval(conv_same(last_in, p['last_conv']['kernel']), p['last_conv']['bn'],
                                 s['last_conv']['bn']), 0, 6)
  np.testing.assert_allclose(sown['last_conv'], last, rtol=1e-4, atol=1e-4)
  assert (last == 0).any() and ((last > 0) & (last < 6)).any()


@pytest.mark.parametrize('name', ['block0_dw', 'block1_expand', 'block16_project'])
def test_mobilenetv2_inner_convs_sow_their_conv_output(mobilenetv2, name):
  """The same pass: every other conv sows its raw conv output, negatives included (no BatchNorm, no clip)."""
  model, variables, _, sown, inputs = mobilenetv2
  spec = model.spec.conv(name)
  kernel = np.asarray(variables['params'][name]['kernel'], np.float64)
  if spec.depthwise:  # (3, 3, 1, C): channel c reads input channel c only
    expected = np.concatenate([conv_same(inputs[name][..., c:c + 1], kernel[..., c:c + 1])
                               for c in range(spec.out_channels)], axis=-1)
  else:
    expected = conv_same(inputs[name], kernel)
  np.testing.assert_allclose(sown[name], expected, rtol=1e-4, atol=1e-4)
  assert (expected < 0).any()


def test_mobilenetv2_stem_rank_is_the_rank_of_the_relu6_map(mobilenetv2):
  """criteria reads the post-ReLU6 stem map: its mean rank equals numpy's rank of the hand-computed map."""
  model, variables, x, _, _ = mobilenetv2
  p, s = variables['params']['stem'], variables['batch_stats']['stem']
  maps = np.clip(batch_norm_eval(conv_same(x.astype(np.float64), np.asarray(p['kernel'], np.float64)),
                                 jax.tree.map(np.asarray, p['bn']), jax.tree.map(np.asarray, s['bn'])), 0, 6)
  reference = np.linalg.matrix_rank(np.transpose(maps.astype(np.float32), (0, 3, 1, 2))).mean(0)
  fp = criteria.filter_properties(model, variables, x, 'rank')
  np.testing.assert_array_equal(fp['stem'], reference.astype(np.float32))
  # Clipping lowers the rank (saturated regions), so the pre-activation tap would have given more.
  raw = conv_same(x.astype(np.float64), np.asarray(p['kernel'], np.float64))
  assert reference.mean() < np.linalg.matrix_rank(np.transpose(raw, (0, 3, 1, 2))).mean()


def test_unit_tapped_after_its_activation_needs_one():
  spec = models.get_spec('mobilenetv2', 10, 8, 3).conv('stem')
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="'stem' takes its rank after its activation"):
    jax.eval_shape(lambda: MaskedQConv(spec).init(jax.random.key(0), x, False))
