"""Training: data-parallel steps equal single-device steps; fit resumes exactly; bad input stops clearly."""
import json
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
from picpq_jax.testing import random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_four_devices_give_the_same_losses_as_one():
  assert jax.device_count() >= 4, 'conftest fakes 4 CPU devices'
  model = models.create_model('resnet20', 10, 16, 1)
  # lr 0.01, not 0.05: at 0.05 this random-label trajectory is ill-conditioned at step 3 (a 1e-7 relative
  # perturbation of the initial parameters moved the third loss by 5e-4, measured), so float32 reduction
  # order alone, which differs between instruction sets and shardings, moved it by that much. At 0.01 the same
  # perturbation moves every loss by <= 2.5e-7: the losses are well-conditioned functions of the sums.
  tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
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
  # 4 devices add the batch-mean loss, the gradients and the BatchNorm statistics in another order than 1.
  # A float32 sum of n terms in any order is within (n - 1) * 2^-24 * sum|terms| of the exact sum; the largest
  # sums here have n = 8 * 16 * 16 = 2048 terms (BatchNorm statistics of the stem), so each differs by at most
  # ~1.2e-4 relative, and the well-conditioned losses (above) by no more. A sharding bug is far outside that:
  # per-device BatchNorm statistics (4 x 2 images instead of 8) move the first loss by 1.7e-2 (measured).
  np.testing.assert_allclose(losses[4], losses[1], rtol=1.2e-4)
  assert losses[1][0] != losses[1][2]  # the steps really trained


def test_precise_batch_stats_are_the_mean_batch_statistics():
  """Each BatchNorm's precise statistics are the mean over batches of its input's per-channel batch mean and
  (biased) variance, here read from the conv outputs a training-mode forward sows (computed another way)."""
  model = models.create_model('resnet20', 10, 16, 1)
  variables = random_variables(model.spec)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(8, 16, 16, 1)).astype(np.float32)} for _ in range(2)]
  bits = {c.name: 32 if c.source is None else 4 for c in model.spec.convs}  # the quantized path
  from picpq_jax import bits as bits_lib
  tree = bits_lib.bits_tree(bits)
  step = jax.jit(training.make_batch_stats_step(model))
  got = training.precise_batch_stats(step, variables, batches, training.data_mesh(), None, tree)

  @jax.jit
  def sown(x):
    _, out = model.apply(variables, x, train=True, bits=tree, mutable=['batch_stats', 'intermediates'])
    return {k: v['conv'][0] for k, v in out['intermediates'].items()}

  outputs = [jax.tree.map(np.asarray, sown(b['image'])) for b in batches]
  for c in model.spec.convs:
    ys = [o[c.name].astype(np.float64) for o in outputs]
    mean = np.mean([y.mean(axis=(0, 1, 2)) for y in ys], axis=0)
    var = np.mean([y.var(axis=(0, 1, 2)) for y in ys], axis=0)
    np.testing.assert_allclose(got[c.name]['bn']['mean'], mean, rtol=1e-4, atol=1e-5, err_msg=c.name)
    np.testing.assert_allclose(got[c.name]['bn']['var'], var, rtol=1e-3, atol=1e-5, err_msg=c.name)
  assert not np.allclose(got['stem']['bn']['var'], variables['batch_stats']['stem']['bn']['var'])


def test_distillation_loss_known_answers():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
  teacher = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]], np.float32)
  for t in (1.0, 4.0):
    p = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
    q = np.exp(logits / t) / np.exp(logits / t).sum(-1, keepdims=True)
    want = t * t * np.mean(np.sum(p * np.log(p / q), -1))  # written out: T^2 KL(p || q)
    np.testing.assert_allclose(training.distillation_loss(logits, teacher, t), want, rtol=1e-5)
  assert float(training.distillation_loss(teacher, teacher, 4.0)) == pytest.approx(0.0, abs=1e-6)
  # Only the teacher's shape of the distribution matters: shifting its logits changes nothing.
  np.testing.assert_allclose(training.distillation_loss(logits, teacher + 5.0, 2.0),
                             training.distillation_loss(logits, teacher, 2.0), rtol=1e-5)


def test_train_step_distills_from_the_teacher():
  """The step's loss is (1 - w) CE + w KD with the teacher's eval-mode logits, each computed separately."""
  model = models.create_model('resnet20', 10, 16, 1)
  student = random_variables(model.spec, seed=0)
  teacher = random_variables(model.spec, seed=1)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 8).astype(np.int32)}
  tx = optax.sgd(0.01)
  state = training.TrainState(step=0, params=student['params'], batch_stats=student['batch_stats'],
                              opt_state=tx.init(student['params']))
  _, m = jax.jit(training.make_train_step(model, tx, distill_weight=0.25, temperature=3.0))(
      state, batch, None, None, teacher)
  logits, _ = model.apply(student, batch['image'], train=True, mutable=['batch_stats'])
  t_logits = model.apply(teacher, batch['image'], train=False)
  ce = training.cross_entropy(logits, batch['label'])
  kd = training.distillation_loss(logits, t_logits, 3.0)
  np.testing.assert_allclose(m['loss'], 0.75 * ce + 0.25 * kd, rtol=1e-5)
  assert abs(float(kd) - float(ce)) > 1e-2  # the two parts differ, so a wrong mix would show


def tiny_config():
  c = demo_mnist5k.get_config()
  c.data.test_size = 500
  c.data.train_size = 500  # 3 steps of 128 per epoch
  c.data.val_size = 200
  c.train.epochs = 2
  c.train.eval_batch_size = 100
  c.search.val_batch_size = 100  # a valid config throughout: at most data.val_size
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

  # The latest step of the finished run truncated: the fit resumes from the intact step before it (epoch 1),
  # trains epoch 2 again and ends where the uninterrupted run did, its metrics row replaced, not repeated.
  latest = tmp_path / 'a' / 'baseline' / str(int(full['state'].step))
  files = [os.path.join(r, f) for r, _, fs in os.walk(latest) for f in fs]
  data_file = max(files, key=os.path.getsize)
  with open(data_file, 'r+b') as f:
    f.truncate(os.path.getsize(data_file) // 2)
  again = training.fit(config, str(tmp_path / 'a'), model)
  for a, b in zip(jax.tree.leaves(full['state'].params), jax.tree.leaves(again['state'].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [json.loads(l)['epoch'] for l in open(tmp_path / 'a' / 'baseline.jsonl')] == [1, 2]

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
    ('--config.finetune.distill_weight=1.5', 'finetune.distill_weight=1.5'),
])
def test_bad_input_stops_with_one_sentence(tmp_path, override, needle):
  out = run_train(override, workdir=tmp_path / 'w')
  assert out.returncode != 0
  assert needle in out.stderr
  assert 'Traceback' not in out.stderr
  assert not (tmp_path / 'w' / 'baseline.json').exists()


def group_section(optimizer='adamw'):
  from configs import common
  return common.optimizer_section(
      optimizer=optimizer, learning_rate=1e-3, weight_decay=5e-4, schedule='constant',
      groups={'weights': common.parameter_group(1e-3, 5e-4),
              'dead_zone': common.parameter_group(3e-2, 2.0, leaves=('logit_dz',)),
              'bits': common.parameter_group(1e-2, 0.1, leaves=('logit_bit',))})


def toy_tree():
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': rng.standard_normal((3, 3, 2, 4)).astype(np.float32), 'logit_dz': np.float32(3.0),
                     'logit_bit': np.float32(2.0), 'bn': {'scale': np.ones(4, np.float32)}},
            'dense': {'kernel': rng.standard_normal((4, 3)).astype(np.float32), 'logit_dz': np.float32(1.5)}}
  grads = jax.tree.map(lambda p: np.asarray(rng.standard_normal(np.shape(p)), np.float32), params)
  return params, grads


def test_make_optimizer_groups_apply_each_groups_learning_rate_and_decay():
  cfg = group_section()
  tx = training.make_optimizer(cfg, optax.constant_schedule(cfg.learning_rate))
  params, grads = toy_tree()
  labels = training.group_labels(cfg.groups)(params)
  assert labels == {'conv': {'kernel': 'weights', 'logit_dz': 'dead_zone', 'logit_bit': 'bits',
                             'bn': {'scale': 'weights'}}, 'dense': {'kernel': 'weights', 'logit_dz': 'dead_zone'}}
  # one step (from fresh states) compared leaf by leaf
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, g in cfg.groups.items():
    ref = optax.adamw(g.learning_rate, weight_decay=g.weight_decay)
    picked = [(u, p, gr) for u, p, gr, l in zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                                                 jax.tree.leaves(grads), jax.tree.leaves(labels)) if l == name]
    want, _ = ref.update([gr for _, _, gr in picked], ref.init([p for _, p, _ in picked]),
                         [p for _, p, _ in picked])
    for (u, _, _), w in zip(picked, want):
      np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-6, atol=1e-9)
  # the groups really differ: the dead-zone logit moved by its own lr (Adam's first step is ~lr * sign)
  assert abs(float(updates['conv']['logit_dz'])) > 10 * abs(float(updates['conv']['kernel'][0, 0, 0, 0]))


def test_make_optimizer_scales_each_group_with_the_schedule():
  cfg = group_section()
  schedule = optax.linear_schedule(cfg.learning_rate, 0.0, 10)
  tx = training.make_optimizer(cfg, schedule)
  params, grads = toy_tree()
  state = tx.init(params)
  for _ in range(5):
    updates, state = tx.update(grads, state, params)
  ref = optax.adamw(optax.linear_schedule(3e-2, 0.0, 10), weight_decay=2.0)
  ref_state = ref.init(params['conv']['logit_dz'])
  for _ in range(5):
    want, ref_state = ref.update(grads['conv']['logit_dz'], ref_state, params['conv']['logit_dz'])
  np.testing.assert_allclose(float(updates['conv']['logit_dz']), float(want), rtol=1e-5)


def test_a_section_without_groups_is_todays_sgd():
  config = demo_mnist5k.get_config()
  for section in (config.train, config.finetune, config.search):
    assert len(section.groups) == 0 and section.optimizer == 'sgd'
  cfg = config.train
  tx = training.make_optimizer(cfg, optax.constant_schedule(cfg.learning_rate))
  want = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov))
  params, grads = toy_tree()
  s1, s2 = tx.init(params), want.init(params)
  for _ in range(3):
    u1, s1 = tx.update(grads, s1, params)
    u2, s2 = want.update(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_training_section_has_one_shape():
  config = demo_mnist5k.get_config()
  keys = set(config.train.keys())
  assert {'optimizer', 'learning_rate', 'momentum', 'nesterov', 'weight_decay', 'schedule', 'step_fractions',
          'step_factor', 'epochs', 'batch_size', 'eval_batch_size', 'precise_bn_batches', 'distill_weight',
          'distill_temperature', 'groups'} == keys
  for section in (config.finetune, config.search, config.codeq):
    assert keys <= set(section.keys())
  assert set(config.codeq.groups) == {'weights', 'dead_zone', 'bits'} and config.codeq.optimizer == 'adamw'
