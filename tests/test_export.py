"""Export of the compressed model: slim + integer weights on disk, loaded back as a mask-free Flax model."""
import json
import math
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import data, export, models, quant, topology
from picpq_jax.bits import bits_tree
from picpq_jax.testing import random_masks, random_variables

NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------------ helpers


def mnist_images(size):
  x = data.fixed_batches(data.default_data_config('mnist5k'), 'test', 16, 1, seed=0, train=False)['image'][0]
  assert x.shape == (16, 32, 32, 1)
  return x if size == 32 else x[:, ::32 // size, ::32 // size, :]


def slice_kernel(spec, keep, name, kernel):
  c = spec.conv(name)
  kernel = np.asarray(kernel)[..., keep[name]]
  if c.source is not None and not c.depthwise:
    kernel = kernel[:, :, keep[c.source], :]
  return kernel


class Case:
  """A model, its variables, chain-respecting masks and a jitted masked apply, shared by the tests of a file."""

  def __init__(self, arch, size, seed=0):
    self.spec = models.get_spec(arch, NUM_CLASSES, size, 1)
    self.topo = topology.topology_from_spec(self.spec)
    self.variables = random_variables(self.spec, seed)
    self.masks = random_masks(self.topo, np.random.default_rng(seed + 1))
    self.keep = {n: np.flatnonzero(m) for n, m in self.masks.items()}
    self.x = mnist_images(size)
    # jax.jit(models.Net(spec).apply), cached by spec: shared with export.logit_difference's compiles.
    self.masked_apply = export.compiled_apply(self.spec)

  def masked_logits(self, bits):
    masks = {k: jnp.asarray(v) for k, v in self.masks.items()}
    return np.asarray(self.masked_apply(self.variables, self.x, masks=masks, bits=bits_tree(bits)))

  def slim_logits(self, module, variables, bits):
    # One compile per slim spec (folded or not, any bits: they are traced).
    return np.asarray(export.compiled_apply(module.spec)(variables, self.x, bits=bits))

  def mixed_bits(self, seed=2, choices=(2, 3, 4, 8)):
    rng = np.random.default_rng(seed)
    return {c.name: 32 if c.source is None else int(rng.choice(choices)) for c in self.spec.convs}


_CASES = {}


def case(arch):
  if arch not in _CASES:
    _CASES[arch] = Case(arch, 32 if arch == 'resnet20' else 16)
  return _CASES[arch]


# ---------------------------------------------------------------------------------- integer codes, packing


@pytest.mark.parametrize('bits', list(range(1, 17)) + [24, 31])
def test_pack_round_trip(bits):
  rng = np.random.default_rng(bits)
  n = 2 ** (bits - 1) - 1
  count = 1001  # not a multiple of 8: the last byte is padded
  codes = rng.choice([-1, 1], count) if bits == 1 else rng.integers(-n, n + 1, count)
  if bits > 1:
    codes[:2] = (-n, n)  # both ends of the range
  packed = export.pack_codes(codes, bits)
  assert packed.dtype == np.uint8 and packed.size == math.ceil(count * bits / 8)
  back = export.unpack_codes(packed, bits, count)
  assert back.dtype == (np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32)
  np.testing.assert_array_equal(back, codes)
  with pytest.raises(ValueError, match='codes'):
    export.pack_codes(np.array([n + 1 if bits > 1 else 0]), bits)


def test_pack_layout_is_msb_first_offset_binary():
  # 3 bits, n = 3: codes -3, 0, 3 -> offsets 0, 3, 6 -> 000 011 110 (+ 7 pad bits) = 0b00001111, 0b00000000
  np.testing.assert_array_equal(export.pack_codes([-3, 0, 3], 3), [0b00001111, 0b00000000])
  np.testing.assert_array_equal(export.pack_codes([1, -1, 1], 1), [0b10100000])
  for bad in (0, 32, 2.5):
    with pytest.raises(ValueError, match='1..31'):
      export.pack_codes([0], bad)
  with pytest.raises(ValueError, match='bytes'):
    export.unpack_codes(np.zeros(3, np.uint8), 3, 9)  # 9 codes of 3 bits take 4 bytes


@pytest.mark.parametrize('bits', [1, 2, 3, 4, 5, 8, 16, 24])
def test_codes_are_integers_that_reproduce_weight_quant(bits):
  kernel = np.random.default_rng(bits).normal(0, 0.3, (3, 3, 8, 12)).astype(np.float32)
  codes, scale = export.quantize_kernel(kernel, bits)
  n = 1 if bits == 1 else 2 ** (min(bits, 24) - 1) - 1
  assert codes.dtype == (np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32)
  assert codes.shape == kernel.shape and np.abs(codes).max() <= n
  if bits == 1:
    assert set(np.unique(codes)) == {-1, 1}
    assert scale == pytest.approx(np.abs(kernel).mean(), rel=1e-6)
  else:
    assert scale == float(np.float32(1) / np.float32(n))
    assert np.abs(codes).max() == n  # the largest |tanh w| sits on the grid's end
  wq = np.asarray(jax.jit(quant.weight_quant)(kernel, jnp.int32(bits)))
  np.testing.assert_array_equal((codes.astype(np.float64) * scale).astype(np.float32), wq)


# --------------------------------------------------------------------------- the slim model on real inputs


@pytest.mark.parametrize('arch', ['resnet20', pytest.param('mobilenetv2', marks=pytest.mark.slow)])
def test_slim_model_equals_masked_fake_quantized_model(arch, tmp_path):
  c = case(arch)
  # (a) Weights on {-1, 0, 1} (2 bits) and activations on {0, 1} (1 bit): every conv sum is a small integer,
  # and the folded BN cannot push an activation across the 1-bit step at 0.5 by an ulp on these inputs.
  exact_bits = {n.name: 32 if n.source is None else (2, 1) for n in c.spec.convs}
  want = c.masked_logits(exact_bits)
  for fold in (False, True):
    path = str(tmp_path / f'exact_{fold}.npz')
    export.export_model(path, c.spec, c.variables, c.masks, exact_bits, fold_bn=fold)
    module, variables, bits = export.load_model(path)
    assert module.spec == export.slim_spec(c.spec, c.keep, kernel_on_grid=True)
    assert {k: v.tolist() for k, v in bits.items()} == {
        n.name: [32, 32] if n.source is None else [2, 1] for n in c.spec.convs}
    got = c.slim_logits(module, variables, bits)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  diff = export.logit_difference(path, c.spec, c.variables, c.masks, exact_bits, c.x)  # the library's check
  assert diff.shape == (16,) and diff.max() <= 1e-4

  # (b) The method's shared bits, mixed {2, 3, 4, 8} (stem 32). Both models convolve the same integer codes,
  # exact in any order, so the unfolded export agrees on every image. Folding BN rounds the affine map
  # differently and may move a rare activation across a rounding step: most images agree, and every prediction.
  mixed = c.mixed_bits()
  want = c.masked_logits(mixed)
  for fold in (False, True):
    path = str(tmp_path / f'mixed_{fold}.npz')
    export.export_model(path, c.spec, c.variables, c.masks, mixed, fold_bn=fold)
    module, variables, bits = export.load_model(path)
    got = c.slim_logits(module, variables, bits)
    per_image = np.abs(got - want).max(axis=1)
    if not fold:
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert (per_image <= 1e-4).sum() >= len(per_image) - 2, per_image
    assert np.median(per_image) <= 1e-5, per_image
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
  # The comparison can fail: without activation quantization the slim model is far off.
  plain = c.slim_logits(module, variables, {k: jnp.array([32, 32]) for k in bits})
  assert (np.abs(plain - want).max(axis=1) > 1e-2).all()


def test_loaded_weights_are_the_masked_models_quantized_weights(tmp_path):
  """Bit for bit, including a 1-bit layer (mean|w| over the WHOLE kernel), 16-bit and 32-bit layers."""
  c = case('resnet20')
  bits = c.mixed_bits(seed=3, choices=(2, 3, 5, 8))
  bits.update({'layer1_0_conv1': 1, 'layer1_1_conv1': 16, 'layer2_0_conv1': 32, 'layer3_0_conv1': 1})
  path = str(tmp_path / 'model.npz')
  export.export_model(path, c.spec, c.variables, c.masks, bits)
  _, variables, _ = export.load_model(path)
  names = [n.name for n in c.spec.convs]
  full = jax.jit(lambda ks, bs: [quant.weight_quant(k, b) for k, b in zip(ks, bs)])(
      [c.variables['params'][n]['kernel'] for n in names], [jnp.int32(bits[n]) for n in names])
  for name, wq in zip(names, full):
    np.testing.assert_array_equal(np.asarray(variables['params'][name]['kernel']),
                                  slice_kernel(c.spec, c.keep, name, wq), err_msg=name)
  with np.load(path) as npz:
    manifest = json.loads(npz['__manifest__'].tobytes())
    layers = {l['name']: l for l in manifest['layers']}
    assert npz['layer2_0_conv1/kernel'].dtype == np.float32 and 'layer2_0_conv1/codes' not in npz.files
  full_kernel = np.asarray(c.variables['params']['layer1_0_conv1']['kernel'])
  sliced = slice_kernel(c.spec, c.keep, 'layer1_0_conv1', full_kernel)
  assert layers['layer1_0_conv1']['scale'] == pytest.approx(np.abs(full_kernel).mean(), rel=1e-6)
  assert abs(np.abs(sliced).mean() - np.abs(full_kernel).mean()) > 1e-3  # the slice's mean would be wrong
  assert layers['layer1_1_conv1']['code_dtype'] == 'int16'
  assert layers['layer1_1_conv1']['scale'] == float(np.float32(1) / np.float32(32767))  # the float32 step
  assert layers['layer2_0_conv1']['kept'] == c.keep['layer2_0_conv1'].tolist()
  assert manifest['arch'] == 'resnet20' and manifest['in_channels'] == 1 and manifest['image_size'] == 32


def test_folded_batch_norm_is_the_affine_map(tmp_path):
  c = case('resnet20')
  path = str(tmp_path / 'folded.npz')
  export.export_model(path, c.spec, c.variables, c.masks, c.mixed_bits(), fold_bn=True)
  _, variables, _ = export.load_model(path)
  name = 'layer1_0_conv2'
  keep = c.keep[name]
  bn = {k: np.asarray(v)[keep] for k, v in c.variables['params'][name]['bn'].items()}
  st = {k: np.asarray(v)[keep] for k, v in c.variables['batch_stats'][name]['bn'].items()}
  y = np.random.default_rng(0).normal(size=(5, len(keep))).astype(np.float32)
  reference = (y - st['mean']) / np.sqrt(st['var'] + 1e-5) * bn['scale'] + bn['bias']
  from flax import linen as nn
  folded = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(
      {'params': variables['params'][name]['bn'], 'batch_stats': variables['batch_stats'][name]['bn']}, y)
  np.testing.assert_allclose(folded, reference, rtol=1e-5, atol=1e-5)
  var = np.asarray(variables['batch_stats'][name]['bn']['var'])
  assert (var + np.float32(1e-5) == 1).all() and not np.asarray(variables['batch_stats'][name]['bn']['mean']).any()


@pytest.mark.parametrize('arch,channels', [('vgg16', 3), ('resnet18', 2)])
def test_loaded_variables_fit_the_slim_module(arch, channels, tmp_path):
  """VGG's head (Dense -> BN) and ResNet-18's projection chains round-trip; the loaded variables have exactly
  the structure, shapes and dtypes of the slim module's own (no apply: compiling these is slow on CPU)."""
  spec = models.get_spec(arch, NUM_CLASSES, 32, channels)
  masks = random_masks(topology.topology_from_spec(spec), np.random.default_rng(0))
  rng = np.random.default_rng(1)
  bits = {c.name: 32 if c.source is None else int(rng.choice([1, 2, 5, 8, 32])) for c in spec.convs}
  path = str(tmp_path / 'm.npz')
  report = export.export_model(path, spec, random_variables(spec), masks, bits, fold_bn=arch == 'vgg16')
  module, variables, loaded_bits = export.load_model(path)
  keep = {n: np.flatnonzero(m) for n, m in masks.items()}
  assert module.spec == export.slim_spec(spec, keep, kernel_on_grid=True)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, channels))))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                shapes)
  assert {k: v.tolist() for k, v in loaded_bits.items()} == {k: [b, b] for k, b in bits.items()}
  assert report['ratio'] > 4


# ------------------------------------------------------------------------------------------------ sizes


def expected_sizes(spec, keep, bits):
  """(bytes of the arrays of an unfolded export, ideal bytes) from the spec and masks alone (not the file).

  ideal: weights * bits / 8 without per-layer byte padding, 4 bytes per float (BN, head, one weight scale
  per quantized layer)."""
  payload, ideal = 0, 0.0
  for c in spec.convs:
    cin = spec.in_channels if c.source is None else len(keep[c.source])
    weights = c.kernel * c.kernel * cin * len(keep[c.name])  # no depthwise convs in ResNet-20
    b = bits.get(c.name, 32)
    payload += 4 * weights if b == 32 else math.ceil(weights * b / 8)
    ideal += weights * b / 8 + (4 if b < 32 else 0)
    payload += 4 * 4 * len(keep[c.name])  # gamma, beta, mean, var
    ideal += 4 * 4 * len(keep[c.name])
  head = 4 * (len(keep[spec.head[0].source]) + 1) * NUM_CLASSES  # classifier kernel + bias
  return payload + head, math.ceil(ideal + head)


def test_file_shrinks_as_the_bits_say(tmp_path):
  c = case('resnet20')
  dense_params = sum(x.size for x in jax.tree.leaves(c.variables['params']))
  sizes = {}
  for b in (2, 8):
    bits = {n.name: 32 if n.source is None else b for n in c.spec.convs}
    path = str(tmp_path / f'{b}bit.npz')
    report = export.export_model(path, c.spec, c.variables, c.masks, bits, meta={'bits': b})
    assert report == export.size_report(path)
    assert report['dense_fp32_bytes'] == 4 * dense_params == 1_077_736
    assert report['export_bytes'] == os.path.getsize(path)
    with zipfile.ZipFile(path) as z:
      entries = len(z.namelist())
    with np.load(path) as npz:
      manifest_bytes = npz['__manifest__'].size
      assert json.loads(npz['__manifest__'].tobytes())['meta'] == {'bits': b}
    payload, ideal = expected_sizes(c.spec, c.keep, bits)
    # The file is the payload, the manifest and, per array, an npy header (128 B) and zip headers (~200 B).
    overhead = report['export_bytes'] - payload - manifest_bytes
    assert 128 * entries <= overhead <= 400 * entries, (overhead, entries)
    assert report['ideal_bytes'] == ideal
    sizes[b] = (report['export_bytes'], payload, manifest_bytes, entries)
    print(f'{b}-bit export: {report}')
  # 8-bit minus 2-bit: exactly the difference of the packed codes (and of the manifests' text).
  (big, payload8, man8, entries), (small, payload2, man2, _) = sizes[8], sizes[2]
  assert big - small == (payload8 - payload2) + (man8 - man2)
  # Their ratio, predicted from the payloads and the bounds on the container overhead (~2.5 here: the float32
  # stem, BatchNorm, head and the npz headers do not shrink with the bits).
  lo = (payload8 + man8 + 400 * entries) / (payload2 + man2 + 400 * entries)
  hi = (payload8 + man8 + 128 * entries) / (payload2 + man2 + 128 * entries)
  assert lo <= big / small <= hi and big / small > 2, (lo, big / small, hi)
  assert sizes[2][0] < 4 * dense_params / 15


# ------------------------------------------------------------------------------------------------ errors


def test_bad_input_is_a_value_error(tmp_path):
  spec = models.get_spec('resnet20', NUM_CLASSES, 32, 1)
  topo = topology.topology_from_spec(spec)
  variables = random_variables(spec)
  masks = random_masks(topo, np.random.default_rng(0))
  path = str(tmp_path / 'm.npz')
  with pytest.raises(ValueError, match='layer9_0_conv1'):
    export.export_model(path, spec, variables, {**masks, 'layer9_0_conv1': np.ones(16)}, {})
  with pytest.raises(ValueError, match='nope'):
    export.export_model(path, spec, variables, masks, {'nope': 4})
  with pytest.raises(ValueError, match=r"bits\['layer1_0_conv1'\].*\b0\b.*1..32"):
    export.export_model(path, spec, variables, masks, {'layer1_0_conv1': 0})
  with pytest.raises(ValueError, match='33'):
    export.export_model(path, spec, variables, masks, {'layer1_0_conv1': 33})
  with pytest.raises(ValueError, match="masks\\['layer1_0_conv1'\\]"):
    export.export_model(path, spec, variables, {**masks, 'layer1_0_conv1': np.ones(5)}, {})
  broken = dict(masks)
  broken['layer1_0_conv2'] = 1 - masks['layer1_0_conv2']  # no longer the chain's mask
  with pytest.raises(ValueError, match='chain'):
    export.export_model(path, spec, variables, broken, {})
  with pytest.raises(ValueError, match='keeps no channel'):
    export.export_model(path, spec, variables, {**masks, 'layer1_0_conv1': np.zeros(16)}, {})
  other = random_variables(models.get_spec('resnet20', NUM_CLASSES, 32, 3))
  with pytest.raises(ValueError, match='stem'):
    export.export_model(path, spec, other, masks, {})
  with pytest.raises(ValueError, match='meta'):
    export.export_model(path, spec, variables, masks, {}, meta={'x': object()})
  assert os.listdir(tmp_path) == []  # nothing written by a failed export


def test_failed_export_keeps_the_previous_file(tmp_path):
  spec = models.get_spec('resnet20', NUM_CLASSES, 32, 1)
  variables = random_variables(spec)
  path = str(tmp_path / 'm.npz')
  export.export_model(path, spec, variables, None, {'layer1_0_conv1': 4})
  before = open(path, 'rb').read()
  with pytest.raises(ValueError):
    export.export_model(path, spec, variables, None, {'layer1_0_conv1': 40})
  assert open(path, 'rb').read() == before and os.listdir(tmp_path) == ['m.npz']
  module, loaded, bits = export.load_model(path)  # no masks: the slim model is the whole model
  assert module.spec == export.slim_spec(spec, export.kept_indices(spec, None), kernel_on_grid=True)
  assert [c.out_channels for c in module.spec.convs] == [c.out_channels for c in spec.convs]
  assert bits['layer1_0_conv1'].tolist() == [4, 4] and bits['stem'].tolist() == [32, 32]


def test_a_file_that_is_not_an_export(tmp_path):
  text = tmp_path / 'notes.npz'
  text.write_text('hello')
  plain = tmp_path / 'plain.npz'
  np.savez(plain, a=np.zeros(3))
  alien = tmp_path / 'alien.npz'
  np.savez(alien, __manifest__=np.frombuffer(json.dumps({'format': 'other'}).encode(), np.uint8))
  spec = models.get_spec('resnet20', NUM_CLASSES, 32, 1)
  good = tmp_path / 'good.npz'
  export.export_model(str(good), spec, random_variables(spec), None, {})
  cut = tmp_path / 'cut.npz'
  cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  for path in (text, plain, alien, cut):
    with pytest.raises(ValueError, match='is not a picpq-jax export'):
      export.load_model(str(path))
  with pytest.raises(FileNotFoundError):
    export.load_model(str(tmp_path / 'missing.npz'))
