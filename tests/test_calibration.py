"""Scaling every activation by c leaves a ReLU network's logits unchanged and moves its range."""
import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax import calibration, models
from picpq_jax.testing import random_masks
from picpq_jax import topology


def test_scaled_network_computes_the_same_logits_with_inputs_in_range():
  spec = models.get_spec('resnet20', 10, 16, 1)
  model = models.Net(spec)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))))
  rng = np.random.default_rng(0)

  def init(path, s):  # a trained-looking network: He-scaled kernels, BN near identity; activations O(1-10)
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape), jnp.float32)
    if 'var' in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), jnp.float32)
    if 'scale' in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
    return jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32)

  variables = jax.tree_util.tree_map_with_path(init, shapes)
  masks = {k: jnp.asarray(v) for k, v in random_masks(topology.topology_from_spec(spec), rng).items()}
  x = jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)
  apply = jax.jit(lambda v: model.apply(v, x, masks=masks))
  before = apply(variables)
  high = calibration.conv_input_percentile(model, variables, x, masks, 99.0)
  assert high > 1.5  # the point: these activations do not fit [0, 1]
  scaled, c = calibration.fit_to_quantizer_range(model, variables, x, masks, 99.0)
  assert c == np.float32(1 / high) or abs(c - 1 / high) < 1e-6
  np.testing.assert_allclose(apply(scaled), before, rtol=2e-4, atol=2e-4)
  assert abs(calibration.conv_input_percentile(model, scaled, x, masks, 99.0) - 1.0) < 1e-3
