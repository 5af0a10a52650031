"""The 'sliced' fitness mode (the kept channels only) gives the masked mode's losses, compiled once per set of
layer widths; 'auto' picks it where it was measured faster; the XLA CPU setting follows the CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_mnist5k
from picpq_jax import fitness, models, pruning, topology
from picpq_jax.models import resnet_cifar

SIZE, BATCH, TAU = 8, 8, 3


def setup_resnet8(keep_fraction=0.6):
  """ResNet-8 (7 convs: the stem chained to every conv2 across three stages, option-A shortcuts) on 8x8x1."""
  config = demo_mnist5k.get_config()
  config.search.tau = TAU
  config.search.keep_fraction = keep_fraction
  spec = resnet_cifar.build_spec(8, num_classes=10, image_size=SIZE, in_channels=1)
  model, topo = models.Net(spec), topology.topology_from_spec(spec)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
  variables['batch_stats'] = jax.tree.map(jnp.abs, variables['batch_stats'])  # positive variances
  fp = [rng.integers(0, SIZE + 1, l.out_channels).astype(np.float32) for l in topo.layers]
  train = {'image': rng.normal(size=(TAU, BATCH, SIZE, SIZE, 1)).astype(np.float32),
           'label': rng.integers(0, 10, (TAU, BATCH)).astype(np.int32)}
  val = {'image': rng.normal(size=(2, BATCH, SIZE, SIZE, 1)).astype(np.float32),
         'label': rng.integers(0, 10, (2, BATCH)).astype(np.int32)}
  fns = fitness.CandidateFns(model, topo, pruning.pad_filter_properties(topo, fp), config.search)
  return fns, variables, train, val


def plans_of_equal_widths(fns, n=512, seed=3):
  """(a, b) of two candidates whose plans keep as many channels in every layer, but not the same ones."""
  rng = np.random.default_rng(seed)
  num_layers = len(fns.model.spec.convs)
  a = np.exp(rng.normal(size=(n, num_layers))).astype(np.float32)
  b = rng.normal(0, 2, size=(n, num_layers)).astype(np.float32)
  masks, info = jax.device_get(jax.vmap(fns.prune)(a, b))
  flat = np.concatenate([m > 0.5 for m in masks.values()], axis=1)
  widths = np.stack([m.sum(axis=1) for m in masks.values()], axis=1)
  for i in np.flatnonzero(info['reached']):
    same = np.flatnonzero(np.all(widths == widths[i], axis=1) & np.any(flat != flat[i], axis=1) & info['reached'])
    if same.size:
      return a[[i, same[0]]], b[[i, same[0]]]
  raise AssertionError('no two plans of equal widths among the candidates drawn')


def test_sliced_losses_equal_masked_losses_one_compile_per_widths():
  """Two plans keeping different channels in equal numbers, then the first again: the masked mode ('host')
  and the sliced one give the same losses, and the sliced mode compiles one train step for all three."""
  fns, variables, train, val = setup_resnet8()
  a, b = plans_of_equal_widths(fns)
  host = fitness.PopulationFitness(fns, variables, train, val, mode='host')(a, b)
  evaluate = fitness.PopulationFitness(fns, variables, train, val, mode='sliced', chunk_size=2)
  sliced = evaluate(a[[0, 1, 0]], b[[0, 1, 0]])
  assert np.all(host['reached']) and abs(host['loss'][0] - host['loss'][1]) > 1e-3  # two different plans
  np.testing.assert_allclose(sliced['loss'], host['loss'][[0, 1, 0]], rtol=1e-5)
  np.testing.assert_array_equal(sliced['flops'], host['flops'][[0, 1, 0]])
  assert evaluate.slim_programs.built == 1


def test_round_up_widths_pads_with_the_first_pruned_channels():
  spec = resnet_cifar.build_spec(8, num_classes=10, image_size=SIZE, in_channels=1)
  keep = {c.name: np.arange(c.out_channels) for c in spec.convs}  # unpruned layers stay as they are
  pruned, full = spec.convs[1].name, spec.convs[0].name  # a 16-channel conv1, the 16-channel stem
  keep[pruned] = np.array([1, 4, 6, 9, 10])
  padded, masks = fitness.round_up_widths(spec, keep, 4)
  np.testing.assert_array_equal(padded[pruned], [0, 1, 2, 3, 4, 6, 9, 10])  # 5 -> 8 with pruned 0, 2, 3
  np.testing.assert_array_equal(masks[pruned], [0, 1, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(padded[full], np.arange(16))
  np.testing.assert_array_equal(masks[full], np.ones(16))
  keep[pruned] = np.arange(15)
  padded, masks = fitness.round_up_widths(spec, keep, 32)  # never past the layer's own width
  np.testing.assert_array_equal(padded[pruned], np.arange(16))
  np.testing.assert_array_equal(masks[pruned], np.r_[np.ones(15), 0])


def test_rounded_widths_give_the_exact_widths_losses(monkeypatch):
  """The channels that round the widths up stay masked: the losses with widths rounded to 8 equal those
  of the exact widths and of the masked mode, and two plans of different widths that round alike share
  one compiled step."""
  fns, variables, train, val = setup_resnet8()
  rng = np.random.default_rng(5)
  n = len(fns.model.spec.convs)
  a = np.exp(rng.normal(size=(64, n))).astype(np.float32)
  b = rng.normal(0, 2, size=(64, n)).astype(np.float32)
  masks, info = jax.device_get(jax.vmap(fns.prune)(a, b))
  widths = np.stack([m.sum(axis=1) for m in masks.values()], axis=1)
  multiple = fitness.SLICE_WIDTH_MULTIPLE
  rounded = -(-widths // multiple) * multiple
  pair = None
  for i in np.flatnonzero(info['reached']):
    other = np.flatnonzero(np.all(rounded == rounded[i], axis=1) & np.any(widths != widths[i], axis=1)
                           & info['reached'])
    if other.size and np.any(widths[i] % multiple):
      pair = [i, other[0]]
      break
  assert pair is not None, 'no two plans of different widths that round alike among the candidates drawn'
  host = fitness.PopulationFitness(fns, variables, train, val, mode='host')(a[pair], b[pair])
  rounded_eval = fitness.PopulationFitness(fns, variables, train, val, mode='sliced', chunk_size=2)
  out8 = rounded_eval(a[pair], b[pair])
  monkeypatch.setattr(fitness, 'SLICE_WIDTH_MULTIPLE', 1)
  exact_eval = fitness.PopulationFitness(fns, variables, train, val, mode='sliced', chunk_size=2)
  out1 = exact_eval(a[pair], b[pair])
  np.testing.assert_allclose(out8['loss'], host['loss'], rtol=1e-5)
  np.testing.assert_allclose(out1['loss'], host['loss'], rtol=1e-5)
  assert rounded_eval.slim_programs.built == 1 and exact_eval.slim_programs.built == 2


def test_unreached_target_fails_without_compiling():
  fns, variables, train, val = setup_resnet8(keep_fraction=0.01)  # below what the safeguard allows
  evaluate = fitness.PopulationFitness(fns, variables, train, val, mode='sliced')
  n = len(fns.model.spec.convs)
  out = evaluate(np.ones((1, n), np.float32), np.zeros((1, n), np.float32))
  assert not out['reached'][0] and np.isnan(out['loss'][0]) and evaluate.slim_programs.built == 0


def test_auto_mode_and_quantize():
  assert fitness.resolve_eval_mode('auto', 'cpu', tau=200) == 'sliced'
  assert fitness.resolve_eval_mode('auto', 'cpu', tau=12) == 'host'  # compiling per candidate costs more
  assert fitness.resolve_eval_mode('auto', 'cpu', tau=200, quantize=True) == 'host'
  assert fitness.resolve_eval_mode('auto', 'gpu', tau=200) == 'vmap'
  with pytest.raises(ValueError, match='search.quantize'):
    fitness.resolve_eval_mode('sliced', 'cpu', tau=200, quantize=True)


def test_xla_setting_follows_the_cpu():
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  intel = 'processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw\n'
  amd = 'processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2 sha_ni\n'
  old = 'processor\t: 0\nflags\t\t: fpu sse sse2 sse4_2 avx\n'
  arm = 'processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n'
  assert [xla_setup.cpu_isa(t) for t in (intel, amd, old, arm)] == ['AVX512', 'AVX2', 'other', 'other']
  assert xla_setup.cpu_flags('AVX2') == xla_setup.FAST_CPU_FLAGS and xla_setup.cpu_flags('other') == ''
