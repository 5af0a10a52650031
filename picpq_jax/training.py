"""Train state, the jitted train/eval steps, and the epoch loop shared by every stage.

Baseline training, the search's tau-step fine-tunes (fitness.py) and the QAT stages all use `loss_fn`,
`make_train_step` and `make_eval_step`; masks and bits are ordinary pytree arguments, so one compiled step
serves every candidate. Data parallelism: the batch is sharded over a 1-D mesh of all local devices along
'data', parameters and optimizer state are replicated; XLA inserts the gradient all-reduce.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from picpq_jax import checkpoints, data, hosts
from picpq_jax.metrics import MetricWriter
from picpq_jax.models.layers import BN_MOMENTUM


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


# ----------------------------------------------------------------------------------------------------------
# Optimizer and schedules
# ----------------------------------------------------------------------------------------------------------

SCHEDULES = ('cosine', 'step', 'constant')


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """cfg.schedule: 'cosine' (to 0 over all epochs), 'step' (x cfg.step_factor at cfg.step_fractions of the
  epochs; the original's 0.2 at 30/60/80 %) or 'constant'."""
  total = max(1, cfg.epochs * steps_per_epoch)
  if cfg.schedule == 'cosine':
    return optax.cosine_decay_schedule(cfg.learning_rate, total)
  if cfg.schedule == 'step':
    boundaries = {int(round(f * total)): cfg.step_factor for f in cfg.step_fractions}
    return optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
  if cfg.schedule == 'constant':
    return optax.constant_schedule(cfg.learning_rate)
  raise ValueError(f"train.schedule={cfg.schedule!r} is not a schedule; choose 'cosine', 'step' or 'constant'.")


OPTIMIZERS = ('sgd', 'adamw')
DEFAULT_GROUP = 'weights'  # the group of every parameter no group names (when the section has groups)


def _one_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
                   weight_decay: float) -> optax.GradientTransformation:
  if cfg.optimizer == 'sgd':
    # L2 weight decay added to the gradient, as torch.optim.SGD does.
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  if cfg.optimizer == 'adamw':
    # Decoupled weight decay (lr * wd * param), torch.optim.AdamW's defaults for the betas and epsilon.
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  raise ValueError(f'optimizer={cfg.optimizer!r} is not an optimizer; choose one of {list(OPTIMIZERS)}.')


def group_labels(groups: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """params -> the same tree with each leaf replaced by its group's name: the group whose `leaves` holds the
  leaf's own name (e.g. 'logit_dz'), else the group with no `leaves` (DEFAULT_GROUP by convention)."""
  by_leaf, default = {}, None
  for name, group in groups.items():
    leaves = tuple(group.get('leaves', ()) or ())
    if not leaves:
      if default is not None:
        raise ValueError(f'optimizer groups {default!r} and {name!r} both have no `leaves`; exactly one group '
                         'takes the parameters no group names.')
      default = name
    for leaf in leaves:
      by_leaf[leaf] = name
  if default is None:
    raise ValueError(f'optimizer groups {list(groups)} all name their leaves; give one group no `leaves` to '
                     'take every other parameter.')

  def labels(params):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    return traverse_util.unflatten_dict({k: by_leaf.get(k[-1], default) for k in flat})

  return labels


def make_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer of a training section (configs/common.py, `optimizer_section`).

  Without groups: cfg.optimizer ('sgd': (Nesterov) momentum with L2 weight decay added to the gradient, as
  torch.optim.SGD; 'adamw': decoupled weight decay, as torch.optim.AdamW) at `schedule` and
  cfg.weight_decay. With groups (cfg.groups: name -> {learning_rate, weight_decay, leaves}): one such
  optimizer per group through optax.multi_transform, each leaf labelled by its name (group_labels); a
  group's learning rate follows the section's schedule scaled by group.learning_rate / cfg.learning_rate.
  """
  groups = cfg.groups
  if not groups:
    return _one_optimizer(cfg, schedule, cfg.weight_decay)
  transforms = {}
  for name, group in groups.items():
    scale = group.learning_rate / cfg.learning_rate
    group_schedule = (lambda step, scale=scale: schedule(step) * scale)
    transforms[name] = _one_optimizer(cfg, group_schedule, group.weight_decay)
  return optax.multi_transform(transforms, group_labels(groups))


def create_train_state(model, tx: optax.GradientTransformation, key: jax.Array, image_shape) -> TrainState:
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))


# ----------------------------------------------------------------------------------------------------------
# Steps (pure; jit them at the call site)
# ----------------------------------------------------------------------------------------------------------

def cross_entropy(logits: jax.Array, labels: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
  """Mean softmax cross-entropy; `weights` (B,) 0/1 drop padded examples."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if weights is None:
    return losses.mean()
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """T^2 KL(softmax(teacher / T) || softmax(logits / T)), the mean over the batch (Hinton et al., 2015).

  The T^2 keeps its gradient on the scale of the cross-entropy's as T changes. logits: (B, classes).
  """
  t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  s = jax.nn.log_softmax(logits / temperature, axis=-1)
  return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def loss_fn(params, batch_stats, model, batch: Mapping[str, jax.Array], masks=None, bits=None,
            teacher_logits=None, distill_weight: float = 0.0, temperature: float = 1.0, weight_masks=None):
  """Training-mode forward (BatchNorm uses and updates batch statistics) -> (loss, (logits, new stats)).

  With teacher_logits: (1 - distill_weight) * cross-entropy + distill_weight * `distillation_loss`.
  weight_masks: layer name -> kernel-shaped 0/1 (Net.apply's), or None.
  """
  logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'], train=True,
                                masks=masks, bits=bits, mutable=['batch_stats'], weight_masks=weight_masks)
  loss = cross_entropy(logits, batch['label'])
  if teacher_logits is not None:
    loss = (1.0 - distill_weight) * loss + distill_weight * distillation_loss(logits, teacher_logits, temperature)
  return loss, (logits, updates['batch_stats'])


def make_train_step(model, tx: optax.GradientTransformation, distill_weight: float = 0.0,
                    temperature: float = 4.0) -> Callable:
  """(state, batch, masks=None, bits=None, teacher=None) -> (state, {'loss', 'accuracy'}): one SGD step.

  teacher: variables of the unmasked, unquantized `model` (the dense baseline); its eval-mode logits on the
  batch are distilled into the student with `distill_weight` (ignored when teacher is None).
  """

  def train_step(state: TrainState, batch, masks=None, bits=None, teacher=None, weight_masks=None):
    teacher_logits = None
    if teacher is not None:
      teacher_logits = jax.lax.stop_gradient(model.apply(teacher, batch['image'], train=False))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats, model, batch, masks, bits,
                                                   teacher_logits, distill_weight, temperature, weight_masks)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new, {'loss': loss, 'accuracy': accuracy}

  return train_step


def make_eval_step(model) -> Callable:
  """(variables, batch, masks=None, bits=None) -> sums {'loss', 'correct', 'count'} over the batch's real
  examples (batch['weight'] marks padding with 0)."""

  def eval_step(variables, batch, masks=None, bits=None, weight_masks=None):
    logits = model.apply(variables, batch['image'], train=False, masks=masks, bits=bits, weight_masks=weight_masks)
    weights = batch.get('weight', jnp.ones(batch['label'].shape, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {'loss': (losses * weights).sum(), 'correct': (correct * weights).sum(), 'count': weights.sum()}

  return eval_step


def make_batch_stats_step(model) -> Callable:
  """(variables, images, masks=None, bits=None) -> this batch's BatchNorm statistics, a batch_stats tree.

  A training-mode forward from zeroed running statistics leaves (1 - momentum) x the batch statistics in
  them (running = momentum * 0 + (1 - momentum) * batch); dividing recovers every BatchNorm's batch mean
  and variance, each computed with the earlier layers normalized by their own batch statistics, as in training.
  """

  def batch_stats_step(variables, images, masks=None, bits=None, weight_masks=None):
    zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
    _, updates = model.apply({'params': variables['params'], 'batch_stats': zeros}, images, train=True,
                             masks=masks, bits=bits, mutable=['batch_stats'], weight_masks=weight_masks)
    return jax.tree.map(lambda s: s / (1.0 - BN_MOMENTUM), updates['batch_stats'])

  return batch_stats_step


def precise_batch_stats(batch_stats_step: Callable, variables, batches: Iterable[Mapping[str, np.ndarray]],
                        mesh: Mesh, masks=None, bits=None, weight_masks=None) -> Any:
  """BatchNorm running statistics replaced by the mean of the batch statistics over `batches` ("precise BN").

  The running averages lag the weights by ~1 / (1 - momentum) steps, and after pruning or quantization the
  weights move fast (quantized ones flip between steps). In the demo's first fine-tuning epoch with masks,
  validation accuracy was 48.6 % with the running averages and 91.4 % with these; in the first epoch with
  2-bit weights, 85.2 % and 94.0 %. Returns a new batch_stats tree.
  """
  total, n = None, 0
  for batch in batches:
    stats = batch_stats_step(variables, shard_batch({'image': batch['image']}, mesh)['image'], masks, bits,
                             weight_masks)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    n += 1
  if n == 0:
    raise ValueError('precise_batch_stats needs at least one batch.')
  return jax.tree.map(lambda s: s / n, total)


# ----------------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------------

def data_mesh() -> Mesh:
  """A 1-D mesh over all devices, axis 'data' (the batch axis of training, the candidate axis of search)."""
  return Mesh(np.array(jax.devices()), ('data',))


# A cross-entropy this many times that of guessing uniformly (ln of the class count) is divergence, not
# learning: an untrained network sits at 1x, a bad but working one at a few x; a diverged one at 1e18 or NaN.
DIVERGED_LOSS_FACTOR = 1000.0


def diverged(loss: float, num_classes: int) -> bool:
  """Whether a mean cross-entropy `loss` means the training diverged: NaN, infinite, or beyond
  DIVERGED_LOSS_FACTOR x ln(num_classes)."""
  return not math.isfinite(loss) or loss > DIVERGED_LOSS_FACTOR * math.log(max(num_classes, 2))


def check_batch_size(batch_size: int, what: str = 'train.batch_size') -> None:
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} is not divisible by the {n} devices; use a multiple of {n} '
                     f'(e.g. {n * max(1, round(batch_size / n))}).')


def process_part() -> tuple[int, int]:
  """(this process's index, the process count): the share of every global batch this process reads
  (data.epoch_batches' `part`)."""
  return jax.process_index(), jax.process_count()


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, local: bool = False) -> dict:
  """A batch as global arrays split by rows over the devices. batch: the global batch (every process keeps
  its rows of it), or with local=True only this process's rows (read with part=process_part())."""
  if not local and jax.process_count() > 1:
    batch = {k: v[hosts.process_rows(len(v))] for k, v in batch.items()}
  return hosts.global_batch(batch, mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` on every device of `mesh` (of every process)."""
  return hosts.replicated(tree, mesh)


def pad_batch(batch: Mapping[str, np.ndarray], multiple: int) -> dict:
  """Pad a (last, short) eval batch to a multiple of the device count; 'weight' marks real examples."""
  n = len(batch['label'])
  size = int(math.ceil(n / multiple) * multiple)
  out = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
  out['weight'] = np.concatenate([np.ones(n, np.float32), np.zeros(size - n, np.float32)])
  return out


def evaluate(eval_step: Callable, variables, batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
             masks=None, bits=None, weight_masks=None) -> dict:
  """Mean loss and accuracy over `batches` (eval_step already jitted)."""
  totals = None
  for batch in batches:
    out = eval_step(variables, shard_batch(pad_batch(batch, mesh.size), mesh), masks, bits, weight_masks)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {'loss': float(totals['loss'] / totals['count']), 'accuracy': float(totals['correct'] / totals['count'])}


# ----------------------------------------------------------------------------------------------------------
# The epoch loop
# ----------------------------------------------------------------------------------------------------------

def fit(config: ml_collections.ConfigDict, workdir: str, model, *, stage: str = 'baseline',
        init_variables: Optional[Mapping[str, Any]] = None, masks=None, bits=None,
        train_cfg: Optional[ml_collections.ConfigDict] = None, select_best: bool = False,
        teacher: Optional[Mapping[str, Any]] = None, weight_masks=None) -> dict:
  """Train `model` for train_cfg.epochs on config.data, checkpointing every epoch under <workdir>/<stage>.

  Resumes from the latest checkpoint there (same step, same optimizer state, same data order: epoch e's
  batches depend only on the seed and e). init_variables: start from these instead of a fresh init (a
  previous stage's best). select_best: also keep the checkpoint with the best validation accuracy under
  <workdir>/<stage>_best. teacher: variables of the dense `model` to distill from when
  train_cfg.distill_weight > 0. weight_masks: layer name -> kernel-shaped 0/1 (a Policy's enforced weight
  masks, policy.model_arguments), passed to every step only when given. Returns the final summary
  (validation metrics, best epoch, wall time).
  """
  train_cfg = train_cfg or config.train
  info = data.dataset_info(config.data)
  section = next((k for k, v in config.items() if v is train_cfg), 'finetune')  # a copied section: finetune's
  check_batch_size(train_cfg.batch_size, f'{section}.batch_size')
  mesh = data_mesh()
  steps_per_epoch = data.steps_per_epoch(config.data, 'train', train_cfg.batch_size)
  schedule = make_schedule(train_cfg, steps_per_epoch)
  tx = make_optimizer(train_cfg, schedule)
  image_shape = (info.image_size, info.image_size, info.in_channels)
  state = create_train_state(model, tx, jax.random.key(config.seed), image_shape)
  if init_variables is not None:
    state = state.replace(params=init_variables['params'], batch_stats=init_variables['batch_stats'],
                          opt_state=tx.init(init_variables['params']))
  meta_expect = {'arch': config.model.arch, 'num_classes': info.num_classes, 'stage': stage}
  mngr = checkpoints.manager(os.path.join(workdir, stage), max_to_keep=2)
  best_mngr = checkpoints.manager(os.path.join(workdir, stage + '_best'), max_to_keep=1) if select_best else None
  start_epoch, best = 0, {'accuracy': -1.0, 'epoch': -1}
  if checkpoints.latest_step(mngr) is not None:
    state, meta = checkpoints.restore(mngr, state, expect=meta_expect)
    start_epoch, best = meta['epoch'] + 1, meta.get('best', best)
  state = replicate(state, mesh)

  distill_weight = train_cfg.distill_weight
  teacher = replicate(teacher, mesh) if teacher is not None and distill_weight > 0 else None
  train_step = jax.jit(make_train_step(model, tx, distill_weight, train_cfg.distill_temperature),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model))
  bn_batches = train_cfg.precise_bn_batches
  if bn_batches:
    # The same un-augmented training images every epoch, so that epochs are compared on equal terms.
    bn_images = data.fixed_batches(config.data, 'train', train_cfg.batch_size, bn_batches, seed=config.seed,
                                   train=False)['image']
    batch_stats_step = jax.jit(make_batch_stats_step(model))
  writer = MetricWriter(workdir, name=stage)
  writer.keep_rows(lambda row: row.get('epoch', 0) <= start_epoch)  # an epoch redone replaces its row
  t_start = time.time()
  for epoch in range(start_epoch, train_cfg.epochs):
    t0, seen = time.time(), 0
    bar = tqdm(data.epoch_batches(config.data, 'train', train_cfg.batch_size, train=True, epoch=epoch,
                                  seed=config.seed, part=process_part()),
               total=steps_per_epoch, desc=f'{stage} epoch {epoch + 1}/{train_cfg.epochs}', leave=False,
               disable=not hosts.is_writer())
    sums = None
    for batch in bar:
      state, m = train_step(state, shard_batch(batch, mesh, local=True), masks, bits, teacher, weight_masks)
      sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
      seen += train_cfg.batch_size
    train_m = {k: float(v) / steps_per_epoch for k, v in jax.device_get(sums).items()}
    if diverged(train_m['loss'], info.num_classes):
      raise FloatingPointError(f'{stage}: the training loss became {train_m["loss"]:.4g} in epoch {epoch + 1} '
                               f'(diverged); lower {section}.learning_rate (now {train_cfg.learning_rate}).')
    elapsed = time.time() - t0
    if bn_batches:
      state = state.replace(batch_stats=precise_batch_stats(
          batch_stats_step, state.variables, ({'image': b} for b in bn_images), mesh, masks, bits,
          weight_masks))
    val = evaluate(eval_step, state.variables, data.epoch_batches(config.data, 'validation',
                                                                 train_cfg.eval_batch_size, train=False),
                   mesh, masks, bits, weight_masks)
    step = int(jax.device_get(state.step))
    row = {'epoch': epoch + 1, 'train_loss': train_m['loss'], 'train_accuracy': train_m['accuracy'],
           'val_loss': val['loss'], 'val_accuracy': val['accuracy'], 'learning_rate': float(schedule(step)),
           'images_per_sec': seen / elapsed}
    writer.write(step, 'epoch', row)
    if hosts.is_writer():
      tqdm.write(f'{stage} epoch {epoch + 1}: loss {train_m["loss"]:.4f} train acc {train_m["accuracy"]:.4f} '
                 f'val acc {val["accuracy"]:.4f} ({seen / elapsed:.0f} img/s)')
    if select_best and val['accuracy'] > best['accuracy']:
      best = {'accuracy': val['accuracy'], 'epoch': epoch}
      checkpoints.save(best_mngr, step, state, {**meta_expect, 'epoch': epoch, 'best': best})
    checkpoints.save(mngr, step, state, {**meta_expect, 'epoch': epoch, 'best': best})
  return {'stage': stage, 'epochs': train_cfg.epochs, 'best': best, 'wall_time_s': time.time() - t_start,
          'state': state}


def load_variables(workdir: str, stage: str, config, best: bool = False) -> dict:
  """The {'params', 'batch_stats'} of the latest (or best) checkpoint of `stage` in `workdir` (host arrays).

  Restored without a target: the optimizer state's structure depends on the stage's recipe, and only the
  model's variables are wanted.
  """
  directory = os.path.join(workdir, stage + ('_best' if best else ''))
  mngr = checkpoints.manager(directory)
  if checkpoints.latest_step(mngr) is None:
    raise FileNotFoundError(f'no {stage} checkpoint in {directory}; run that stage first.')
  # The latest step exactly: a finished stage's result is its last checkpoint, never an earlier one.
  state, _ = checkpoints.restore(mngr, None, step=checkpoints.latest_step(mngr), expect={'arch': config.model.arch})
  # Host numpy, not the saved (replicated) sharding: callers place the arrays where their computation runs.
  return jax.device_get({'params': state['params'], 'batch_stats': state['batch_stats']})
