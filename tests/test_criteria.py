"""Filter properties (feature-map rank, L1, L2, |BN gamma|), the PIC transform and the FP scale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import criteria, models
from picpq_jax.testing import random_variables


def known_rank_maps(rng, n=3, h=8, w=6):
  """(n, h, w, C) maps with the rank of every channel known by construction, and that rank (C,)."""
  channels, ranks = [], []
  for r in range(min(h, w) + 1):  # sums of r outer products: rank r (r = 0 is the zero map)
    u = rng.standard_normal((n, h, r))
    v = rng.standard_normal((n, r, w))
    channels.append(u @ v)
    ranks.append(r)
  channels.append(np.full((n, h, w), 2.5))  # constant map: rank 1
  ranks.append(1)
  channels.append(1e-3 * rng.standard_normal((n, h, w)))  # small but full rank: the tolerance is relative
  ranks.append(min(h, w))
  maps = np.stack(channels, axis=-1).astype(np.float32)
  return maps, np.array(ranks)


def numpy_ranks(maps):
  """(N, H, W, C) -> (N, C) ranks by np.linalg.matrix_rank, one map at a time."""
  n, _, _, c = maps.shape
  return np.array([[np.linalg.matrix_rank(maps[i, :, :, j]) for j in range(c)] for i in range(n)])


@pytest.mark.parametrize('h,w', [(8, 6), (5, 5)])
def test_feature_map_rank_matches_numpy_and_construction(h, w):
  maps, ranks = known_rank_maps(np.random.default_rng(0), h=h, w=w)
  reference = numpy_ranks(maps)
  np.testing.assert_array_equal(reference, np.broadcast_to(ranks, reference.shape))  # the construction holds
  np.testing.assert_array_equal(criteria.map_ranks(jnp.asarray(maps)), reference)
  fmr = jax.jit(criteria.feature_map_rank)(jnp.asarray(maps))
  assert fmr.dtype == jnp.float32 and fmr.shape == (maps.shape[-1],)
  np.testing.assert_array_equal(fmr, ranks.astype(np.float32))


def test_rank_tolerance_is_sigma_max_times_max_dim_times_eps():
  """Diagonal maps (exact singular values) straddling the tolerance 1 * max(8, 6) * eps(float32) ~ 9.5e-7."""
  eps = np.finfo(np.float32).eps
  maps = np.zeros((1, 8, 6, 3), np.float32)
  maps[0, 0, 0, :] = 1.0
  maps[0, 1, 1, 0] = 7.0 * eps  # below tolerance (though above 6 * eps, a min(H, W) tolerance)
  maps[0, 1, 1, 1] = 9.0 * eps  # above
  maps[0, 1, 1, 2] = 4.0 * eps  # below
  maps[0, 2, 2, 2] = 8.5 * eps  # above
  np.testing.assert_array_equal(criteria.feature_map_rank(jnp.asarray(maps)), [1.0, 2.0, 2.0])
  np.testing.assert_array_equal(numpy_ranks(maps)[0], [1, 2, 2])


def test_feature_map_rank_averages_over_images():
  rng = np.random.default_rng(1)
  # Channel 0: rank 1 in image 0, rank 3 in image 1 -> mean 2; channel 1: a random 4x4 map, rank 4.
  m0 = np.stack([np.outer(rng.standard_normal(4), rng.standard_normal(4)),
                 rng.standard_normal((4, 3)) @ rng.standard_normal((3, 4))])
  m1 = rng.standard_normal((2, 4, 4))
  maps = np.stack([m0, m1], axis=-1).astype(np.float32)
  np.testing.assert_array_equal(criteria.feature_map_rank(jnp.asarray(maps)), [2.0, 4.0])
  np.testing.assert_array_equal(criteria.feature_map_rank(jnp.asarray(maps)), numpy_ranks(maps).mean(0))


@pytest.fixture(scope='module')
def tiny_model():
  """ResNet-20 on 16x16x1 images, random variables, and two batches of 4 images."""
  model = models.create_model('resnet20', 10, 16, 1)
  variables = random_variables(model.spec, spread=0.5)  # some negative gammas
  images = np.random.default_rng(2).standard_normal((2, 4, 16, 16, 1)).astype(np.float32)
  images[1, 0] = 0.0  # an all-zero image: its stem maps are all zero (no conv bias), rank 0
  return model, variables, images


def test_filter_properties_rank_matches_numpy_reference(tiny_model):
  model, variables, images = tiny_model
  names = [c.name for c in model.spec.convs]
  totals = {n: 0.0 for n in names}
  for x in images:  # reference: un-jitted forward, every pre-BN map ranked by numpy
    _, state = model.apply(variables, jnp.asarray(x), train=False, mutable=['intermediates'])
    for n in names:
      maps = np.asarray(state['intermediates'][n]['conv'][0])
      totals[n] = totals[n] + np.linalg.matrix_rank(np.transpose(maps, (0, 3, 1, 2))).sum(0)
  reference = {n: totals[n] / 8 for n in names}

  fp = criteria.filter_properties(model, variables, images, 'rank')
  assert list(fp) == names
  for n in names:
    assert fp[n].dtype == np.float32 and fp[n].shape == (model.spec.conv(n).out_channels,)
    np.testing.assert_array_equal(fp[n], reference[n].astype(np.float32), err_msg=n)
  assert fp['stem'].max() <= 7 / 8 * 16  # the zero image's stem maps count as rank 0
  # A list of batches and the data pipeline's dicts give the same result as the stacked array.
  as_dicts = [{'image': x, 'label': np.zeros(4, np.int32)} for x in images]
  fp_dicts = criteria.filter_properties(model, variables, as_dicts, 'rank')
  for n in names:
    np.testing.assert_array_equal(fp_dicts[n], fp[n])


def test_weight_properties_match_numpy(tiny_model):
  model, variables, _ = tiny_model
  params = variables['params']
  l1 = criteria.filter_properties(model, variables, kind='l1')
  l2 = criteria.filter_properties(model, variables, kind='l2')
  gamma = criteria.filter_properties(model, variables, kind='bn_gamma')
  assert list(l1) == [c.name for c in model.spec.convs]
  for c in model.spec.convs:
    kernel = np.asarray(params[c.name]['kernel'], np.float64)
    per_filter = kernel.reshape(-1, c.out_channels).T  # (out, k*k*in)
    np.testing.assert_allclose(l1[c.name], [np.sum(np.abs(f)) for f in per_filter], rtol=1e-5)
    np.testing.assert_allclose(l2[c.name], [np.linalg.norm(f) for f in per_filter], rtol=1e-5)
    np.testing.assert_array_equal(gamma[c.name], np.abs(np.asarray(params[c.name]['bn']['scale'])))
  # so |.| is really exercised
  assert any((np.asarray(params[c.name]['bn']['scale']) < 0).any() for c in model.spec.convs)


def test_filter_properties_rejects_unknown_kind(tiny_model):
  model, variables, images = tiny_model
  with pytest.raises(ValueError, match=r"search\.criterion='hrank'.*'rank', 'l1', 'l2', 'bn_gamma'"):
    criteria.filter_properties(model, variables, images, 'hrank')
  with pytest.raises(ValueError, match='calibration images'):
    criteria.filter_properties(model, variables, None, 'rank')


def test_pic_importance_hand_example():
  np.testing.assert_allclose(criteria.pic_importance(jnp.array([1.0, 2.0, 3.0]), 2.0, -1.0), [1.0, 3.0, 5.0])
  fp = jnp.array([[1.0, 2.0], [10.0, 20.0]])  # (L, C)
  a = jnp.array([[0.5], [2.0]])
  b = jnp.array([[1.0], [-5.0]])
  np.testing.assert_allclose(criteria.pic_importance(fp, a, b), [[1.5, 2.0], [15.0, 35.0]])


def test_fp_std_hand_example_and_zero_guard():
  fp = {'a': np.array([1.0, 3.0]), 'b': np.array([7.0, 7.0, 7.0]), 'c': np.array([0.0, 4.0, 0.0, 4.0]),
        'd': np.array([0.1, 0.1, 0.1])}
  std = criteria.fp_std(fp, ['c', 'a', 'b', 'd'])
  assert std.dtype == np.float32 and std.shape == (4,)
  np.testing.assert_allclose(std, [2.0, 1.0, 1.0, 1.0])  # equal values (b, d) -> 1.0, not 0
  with pytest.raises(ValueError, match='missing_layer'):
    criteria.fp_std(fp, ['a', 'missing_layer'])
