"""Filter properties and the PIC criterion (METHOD.md, stages 2 and 3).

A filter property (FP) is one number per output filter of every prunable conv: by default the mean numerical
rank of the filter's HxW output map over calibration images (HRank's criterion), taken at the conv output
before BatchNorm with the model in eval mode; or the L1 / L2 norm of the filter's weights, or |BN gamma|.
MobileNetV2's stem and last 1x1 conv are the exception: their rank is taken after their ReLU6, where the
original's generate_rank.py hooks them (`features[0][2]`, `features[18][2]`, the ReLU6 modules; every other
hook there is on a Conv2d). Their specs set `rank_after_activation`, and the conv unit then sows that map
under the same key (models/layers.py), so this module reads one key for every layer.
The PIC importance of filter i of layer l is I_i = a_l * FP_i + b_l (`pic_importance`, the one place that
formula lives).

    fp = filter_properties(model, variables, batches, 'rank')   # layer name -> (out_channels,) float32
    std = fp_std(fp, topology.names)                             # (L,) scale of b in the search encoding
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PROPERTIES = ('rank', 'l1', 'l2', 'bn_gamma')


# --------------------------------------------------------------------------------------------------------
# Feature-map rank
# --------------------------------------------------------------------------------------------------------


def map_ranks(maps: jax.Array) -> jax.Array:
  """Numerical matrix rank of every channel's HxW map: (N, H, W, C) -> (N, C) int32.

  Rank = number of singular values > sigma_max * max(H, W) * eps(float32), the default of numpy / jax /
  torch `matrix_rank`, so an all-zero map has rank 0 (its tolerance is 0 and no value exceeds it). Maps are
  cast to float32 first: the tolerance is defined for float32, whatever dtype the model computes in.
  All N*C maps go through ONE batched singular-value call (no loop over images or channels).
  """
  n, h, w, c = maps.shape
  matrices = jnp.transpose(maps.astype(jnp.float32), (0, 3, 1, 2))  # (N, C, H, W)
  singular_values = jnp.linalg.svd(matrices, compute_uv=False)  # (N, C, min(H, W)), descending
  tol = singular_values[..., :1] * (max(h, w) * jnp.finfo(jnp.float32).eps)
  return jnp.sum(singular_values > tol, axis=-1, dtype=jnp.int32)


def feature_map_rank(maps: jax.Array) -> jax.Array:
  """Mean numerical rank of each channel's HxW map over the N images: (N, H, W, C) -> (C,) float32."""
  return jnp.mean(map_ranks(maps).astype(jnp.float32), axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_rank_sums(model, names: tuple[str, ...], variables: Any, images: jax.Array) -> dict[str, jax.Array]:
  """Sum over one batch of each filter's map rank: layer name -> (out_channels,) int32.

  Sums, not means, so that batches of any size add up exactly; one compile serves every batch of one shape.
  """
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  # `sow` keeps a tuple of every value sown; each conv runs once per forward pass.
  conv_outputs = {name: state['intermediates'][name]['conv'][0] for name in names}
  return {name: jnp.sum(map_ranks(conv_outputs[name]), axis=0) for name in names}


def _image_batches(batches: Any) -> Iterable[Any]:
  """The image arrays of `batches`: a stacked (num_batches, B, H, W, C) array, one (B, H, W, C) array, or an
  iterable of arrays or of data-pipeline dicts {'image': ..., ...}."""
  if hasattr(batches, 'ndim'):
    if batches.ndim == 4:
      return [batches]
    if batches.ndim != 5:
      raise ValueError(f'filter_properties expects images of shape (num_batches, B, H, W, C) or (B, H, W, C), '
                       f'got an array of shape {batches.shape}.')
  return (b['image'] if isinstance(b, Mapping) else b for b in batches)


def rank_properties(model, variables: Any, batches: Any) -> dict[str, np.ndarray]:
  """Mean feature-map rank of every filter of every prunable conv of `model` (a `models.Net`) over all
  images of `batches` (see `_image_batches`): layer name -> (out_channels,) float32, forward order."""
  names = tuple(c.name for c in model.spec.convs)
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  totals = {name: np.zeros(c.out_channels, np.int64) for name, c in zip(names, model.spec.convs)}
  num_images = 0
  for images in _image_batches(batches):
    sums = jax.device_get(_batch_rank_sums(model, names, variables, jnp.asarray(images)))
    for name in names:
      totals[name] += sums[name]
    num_images += images.shape[0]
  if num_images == 0:
    raise ValueError('filter_properties got no calibration images (search.criterion=rank needs at least one '
                     'batch).')
  return {name: (totals[name] / num_images).astype(np.float32) for name in names}


# --------------------------------------------------------------------------------------------------------
# Weight-based properties
# --------------------------------------------------------------------------------------------------------


def filter_l1(kernel: jax.Array) -> np.ndarray:
  """L1 norm of each output filter: kernel (k, k, in / groups, out) -> (out,) float32."""
  return np.sum(np.abs(np.asarray(kernel, np.float32)), axis=(0, 1, 2))


def filter_l2(kernel: jax.Array) -> np.ndarray:
  """L2 norm of each output filter: kernel (k, k, in / groups, out) -> (out,) float32."""
  return np.sqrt(np.sum(np.square(np.asarray(kernel, np.float32)), axis=(0, 1, 2)))


def bn_gamma(bn_params: Mapping[str, Any]) -> np.ndarray:
  """|BatchNorm scale| of each output channel: (out,) float32."""
  return np.abs(np.asarray(bn_params['scale'], np.float32))


def weight_properties(model, variables: Any, kind: str) -> dict[str, np.ndarray]:
  """'l1' / 'l2' / 'bn_gamma' of every prunable conv of `model`: layer name -> (out_channels,) float32."""
  params = variables['params']
  per_layer = {
      'l1': lambda p: filter_l1(p['kernel']),
      'l2': lambda p: filter_l2(p['kernel']),
      'bn_gamma': lambda p: bn_gamma(p['bn']),
  }[kind]
  return {c.name: per_layer(params[c.name]) for c in model.spec.convs}


def filter_properties(model, variables: Any, batches: Any = None, kind: str = 'rank') -> dict[str, np.ndarray]:
  """The filter property `kind` (`search.criterion`) of every prunable conv: name -> (out_channels,) float32.

  Args:
    model: a `models.Net` (its spec names the prunable convs; the result is in its forward order).
    variables: {'params': ..., 'batch_stats': ...} of the baseline.
    batches: calibration images for 'rank' (ignored otherwise): a stacked (num_batches, B, H, W, C) array,
      one (B, H, W, C) array, or an iterable of (B, H, W, C) arrays or of dicts with an 'image' entry.
    kind: 'rank' (mean feature-map rank before BatchNorm, eval mode; after the activation for a conv whose
      spec sets `rank_after_activation`), 'l1' / 'l2' (norm of each output filter's weights kernel[..., j])
      or 'bn_gamma' (|BN scale|).
  """
  if kind not in PROPERTIES:
    raise ValueError(f'search.criterion={kind!r} is not a filter property; choose one of {list(PROPERTIES)}.')
  if kind == 'rank':
    if batches is None:
      raise ValueError('search.criterion=rank needs calibration images (batches); the weight-based criteria '
                       f'{list(PROPERTIES[1:])} do not.')
    return rank_properties(model, variables, batches)
  return weight_properties(model, variables, kind)


# --------------------------------------------------------------------------------------------------------
# The PIC criterion
# --------------------------------------------------------------------------------------------------------


def pic_importance(fp: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """PIC importance I = a * fp + b (METHOD.md, "Criterion"): a > 0 the layer's deformation scale, b its
  relative shift. Broadcasts like jnp arithmetic, e.g. fp (L, C) with a, b (L, 1), or a population axis."""
  return a * fp + b


def fp_std(fp: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
  """(L,) float32 standard deviation (population, ddof=0) of each layer's FP values, in the order of `names`.

  The search draws b_l ~ N(0, std_l); a layer whose FP values are all equal (std 0, e.g. every filter at
  full rank, or a single filter) gets 1.0 instead, so its shift still explores on the scale of one FP unit (one rank) rather
  than being frozen at 0. Every returned value is > 0.
  """
  missing = [n for n in names if n not in fp]
  if missing:
    raise ValueError(f'fp_std: no filter properties for layer(s) {missing[:4]}; give one vector per name.')
  values = [np.asarray(fp[n], np.float64) for n in names]
  std = np.array([np.std(v) for v in values])
  # Decide "all equal" exactly (np.std of equal values can come out as 1e-17 instead of 0).
  all_equal = np.array([np.ptp(v) == 0 for v in values])
  return np.where(all_equal, 1.0, std).astype(np.float32)
