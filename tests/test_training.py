"""Training: data-parallel steps equal single-device steps; fit resumes exactly; bad input stops clearly."""
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from configs import demo_mnist5k
from picpq_jax import checkpoints, models, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_four_devices_give_the_same_losses_as_one():
  assert jax.device_count() >= 4, 'conftest fakes 4 CPU devices'
  model = models.create_model('resnet20', 10, 16, 1)
  tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
              'label': rng.integers(0, 10, 8).astype(np.int32)} for _ in range(3)]
  losses = {}
  for n in (1, 4):
    mesh = Mesh(np.array(jax.devices()[:n]), ('data',))
    state = training.replicate(training.create_train_state(model, tx, jax.random.key(0), (16, 16, 1)), mesh)
    step = jax.jit(training.make_train_step(model, tx))
    out = []
    for b in batches:
      sharded = training.shard_batch(b, mesh)
      assert len(sharded['image'].sharding.device_set) == n
      state, m = step(state, sharded)
      out.append(float(m['loss']))
    losses[n] = out
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
  assert losses[1][0] != losses[1][2]  # the steps really trained


def tiny_config():
  c = demo_mnist5k.get_config()
  c.data.test_size = 4300  # leaves 500 training images: 3 steps of 128 per epoch
  c.data.val_size = 200
  c.train.epochs = 2
  c.train.eval_batch_size = 100
  return c


@pytest.mark.slow
def test_fit_resumes_exactly_where_it_stopped(tmp_path, monkeypatch):
  config = tiny_config()
  model = models.create_model('resnet20', 10, 32, 1)
  full = training.fit(config, str(tmp_path / 'a'), model)

  real_save, calls = checkpoints.save, []

  def save_then_die(*args, **kwargs):  # killed right after the first epoch's checkpoint
    real_save(*args, **kwargs)
    calls.append(1)
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoints, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    training.fit(config, str(tmp_path / 'b'), model)
  monkeypatch.setattr(checkpoints, 'save', real_save)
  resumed = training.fit(config, str(tmp_path / 'b'), model)

  assert int(resumed['state'].step) == int(full['state'].step) == 6
  for a, b in zip(jax.tree.leaves(full['state'].params), jax.tree.leaves(resumed['state'].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [l for l in open(tmp_path / 'b' / 'baseline.jsonl')]
  assert len(rows) == 2  # epoch 1 from the first run, epoch 2 from the resumed one: nothing repeated

  config.model.arch = 'resnet56'
  with pytest.raises(checkpoints.CheckpointMismatchError, match='resnet20'):
    training.fit(config, str(tmp_path / 'b'), models.create_model('resnet56', 10, 32, 1))


def run_train(*args, workdir):
  return subprocess.run([sys.executable, 'train.py', '--config', 'configs/demo_mnist5k.py', '--workdir',
                         str(workdir), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('override,needle', [
    ('--config.model.arch=resnet21', 'model.arch'),
    ('--config.data.name=svhn', 'data.name'),
    ('--config.train.epoch=3', 'epoch'),
    ('--config.train.batch_size=130', 'train.batch_size=130'),
])
def test_bad_input_stops_with_one_sentence(tmp_path, override, needle):
  out = run_train(override, workdir=tmp_path / 'w')
  assert out.returncode != 0
  assert needle in out.stderr
  assert 'Traceback' not in out.stderr
  assert not (tmp_path / 'w' / 'baseline.json').exists()
