"""The PyTorch side of the speed benches: a CIFAR ResNet at any per-conv widths, its train step, and one
search candidate's fitness computed as the original PIC-PQ computes it. torch is never a requirement of
picpq_jax: this file imports only torch and numpy, and runs in its own process (any Python with torch),
answering one JSON command per line on stdin with one JSON line on stdout, so that a JAX bench can
interleave its own measurements with these in one run (`TorchWorker` is that bench's side).

Commands ({"op": ...}):
  version    -> {"torch", "threads"}.
  setup      {"widths": [stem, l1_0_conv1, l1_0_conv2, ...], "num_classes", "batch", "seed"}: a ResNet
             whose convs have these output widths (the dense one: 16 / 32 / 64), SGD as the fitness's.
  steps      {"n", "clock"}: n train steps on one fixed random batch -> {"times": [seconds per step]}.
             clock: 'wall' or 'cpu' (this process's CPU seconds; every command that times takes it).
  candidate  {"widths", "tau", "val_images", "val_batch", "batch", "num_classes", "extra_steps"}: the fitness of one
             candidate as the original computes it, on random data of the right shapes: the pruned model
             (physically smaller: its weights copied from a dense baseline), tau SGD steps (lr 0.01,
             momentum 0.9, weight decay 5e-4, BatchNorm in training mode), then the validation loss
             (eval mode) -> {"seconds", "train_s", "val_s", "loss", "step_times"}; extra_steps: then that
             many more steps, each timed (not part of "seconds"), for a per-step figure.
  unit       {"hw", "c_in", "c_out", "batch", "n", "clock"}: one 3x3 conv (stride 1, padding 1) of a
             (batch, c_in, hw, hw) input, timed n times each: 'forward', its 'input_grad' and 'kernel_grad'
             (aten.convolution_backward), and 'unit': conv -> BatchNorm (training mode) -> ReLU, forward and
             backward of sum(y * g) -> {part: [seconds]}.
  original   {"dir", "keep_fraction", "tau", "val_images", "batch", "seed", "extra_steps"}: the same with the
             ORIGINAL's own code from a checkout of github.com/fanxxxxyi/PIC-PQ at `dir` (its resnet_56, its
             FilterPrunerResNet.pruning_with_transformations with a random perturbation, drives.train /
             drives.test, and the restore of the baseline by torch.load, as learn_ranking_ea does per
             candidate), timed as a whole (it needs tqdm, matplotlib, h5py and pillow too). Its filter
             ranks are 'l1_weight' (no rank files needed; the ranking does not change the cost of a
             candidate); torchvision, which the original imports
             for one isinstance check (Bottleneck) and which does not install beside the CPU torch here,
             is replaced by an empty stand-in when it cannot be imported.
  quit

  <python with torch> bench/torch_reference.py     # serves; the JAX benches start it themselves
"""
from __future__ import annotations

import copy
import io
import json
import os
import sys
import time
import types

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

CIFAR_STAGE_WIDTHS = (16, 32, 64)
# 'cpu': this process's CPU seconds, steadier than wall seconds on a loaded machine for a one-thread run.
CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}


class Block(nn.Module):
  """Basic block: conv-BN-ReLU-conv-BN, plus the option-A shortcut (subsample, zero channels appended),
  then ReLU, as picpq_jax's CIFAR ResNet."""

  def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_mid)
    self.conv2 = nn.Conv2d(c_mid, c_out, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.stride, self.c_out = stride, c_out

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    s = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
    if s.shape[1] < self.c_out:
      s = F.pad(s, (0, 0, 0, 0, 0, self.c_out - s.shape[1]))
    return F.relu(y + s)


class CifarResNet(nn.Module):
  """widths: output channels of every conv in forward order (stem, then conv1, conv2 of each block)."""

  def __init__(self, widths, num_classes: int = 10, in_channels: int = 3):
    super().__init__()
    n = (len(widths) - 1) // 6
    self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
    self.bn = nn.BatchNorm2d(widths[0])
    blocks, prev, i = [], widths[0], 1
    for s in range(3):
      for b in range(n):
        blocks.append(Block(prev, widths[i], widths[i + 1], 2 if (s > 0 and b == 0) else 1))
        prev, i = widths[i + 1], i + 2
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(prev, num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.bn(self.stem(x))))
    return self.fc(x.mean(dim=(2, 3)))


def dense_widths(depth: int = 56) -> list[int]:
  n = (depth - 2) // 6
  return [16] + [w for w in CIFAR_STAGE_WIDTHS for _ in range(2 * n)]


def sliced_from(dense: CifarResNet, widths) -> CifarResNet:
  """A model of `widths` whose tensors are the first channels of `dense`'s (which channels are kept does not
  change the cost; the copy is the original's work of physically pruning the baseline)."""
  small = CifarResNet(widths, dense.fc.out_features, dense.stem.in_channels)
  with torch.no_grad():
    for (name, p_small), p_dense in zip(small.state_dict().items(), dense.state_dict().values()):
      index = tuple(slice(0, n) for n in p_small.shape)
      p_small.copy_(p_dense[index] if p_small.dim() else p_dense)
  return small


def sgd(model):
  return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def random_batch(rng, batch: int, num_classes: int, size: int = 32):
  return (torch.from_numpy(rng.normal(size=(batch, 3, size, size)).astype(np.float32)),
          torch.from_numpy(rng.integers(0, num_classes, batch)))


def train_step(model, opt, x, y):
  opt.zero_grad()
  loss = F.cross_entropy(model(x), y)
  loss.backward()
  opt.step()
  return loss


@torch.no_grad()
def validation_loss(model, batches) -> float:
  model.eval()
  losses = [F.cross_entropy(model(x), y, reduction='none') for x, y in batches]
  model.train()
  return float(torch.cat(losses).mean())


class Server:
  """The state the commands act on (one model for 'steps'; a dense baseline for 'candidate')."""

  def __init__(self):
    self.rng = np.random.default_rng(0)
    self.model = self.opt = self.batch = None
    self.baselines = {}

  def version(self):
    return {'torch': torch.__version__, 'threads': torch.get_num_threads()}

  def setup(self, widths, num_classes=10, batch=128, seed=0):
    torch.manual_seed(seed)
    self.model = CifarResNet(widths, num_classes).train()
    self.opt = sgd(self.model)
    self.batch = random_batch(self.rng, batch, num_classes)
    return {'params': sum(p.numel() for p in self.model.parameters())}

  def steps(self, n, clock='wall'):
    tick = CLOCKS[clock]
    times = []
    for _ in range(n):
      t0 = tick()
      train_step(self.model, self.opt, *self.batch)
      times.append(tick() - t0)
    return {'times': times}

  def candidate(self, widths, tau, val_images, val_batch=128, batch=128, num_classes=10, extra_steps=0,
                clock='wall'):
    depth = len(widths) + 1  # the convs and the classifier
    if depth not in self.baselines:
      self.baselines[depth] = CifarResNet(dense_widths(depth), num_classes)
    train = [random_batch(self.rng, batch, num_classes) for _ in range(4)]
    val = [random_batch(self.rng, min(val_batch, val_images - i), num_classes)
           for i in range(0, val_images, val_batch)]
    tick = CLOCKS[clock]
    t0 = tick()
    model = sliced_from(copy.deepcopy(self.baselines[depth]), widths).train()
    opt = sgd(model)
    for i in range(tau):
      train_step(model, opt, *train[i % len(train)])
    t1 = tick()
    loss = validation_loss(model, val)
    t2 = tick()
    step_times = []
    for i in range(extra_steps):
      s0 = tick()
      train_step(model, opt, *train[i % len(train)])
      step_times.append(tick() - s0)
    return {'seconds': t2 - t0, 'train_s': t1 - t0, 'val_s': t2 - t1, 'loss': loss, 'step_times': step_times}

  def unit(self, hw, c_in, c_out, batch=128, n=5, clock='wall'):
    tick = CLOCKS[clock]
    x = torch.randn(batch, c_in, hw, hw, requires_grad=True)
    conv, bn = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
    w = conv.weight
    dy = torch.randn(batch, c_out, hw, hw)

    def grad(which):  # which: (input, weight, bias) gradients wanted
      return torch.ops.aten.convolution_backward(dy, x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, which)

    def unit():
      (torch.relu(bn(conv(x))) * dy).sum().backward()

    parts = {'forward': lambda: F.conv2d(x, w, padding=1), 'input_grad': lambda: grad((True, False, False)),
             'kernel_grad': lambda: grad((False, True, False)), 'unit': unit}
    out = {}
    for name, fn in parts.items():
      with torch.set_grad_enabled(name == 'unit'):
        fn()  # warm-up
        times = []
        for _ in range(n):
          t0 = tick()
          fn()
          times.append(tick() - t0)
      out[name] = times
    return out

  def original(self, dir, keep_fraction=0.45, tau=200, val_images=5000, batch=128, seed=0,  # noqa: A002
               extra_steps=0, clock='wall'):
    return run_original(dir, keep_fraction, tau, val_images, batch, seed, self.rng, extra_steps, CLOCKS[clock])


class Loader:
  """`length` batches cycled from a few: the original's drives.train runs `steps` steps of one epoch when
  steps < len(loader) (its CIFAR loader holds 352 batches), and more when not."""

  def __init__(self, batches, length: int):
    self.batches, self.length = batches, length

  def __len__(self):
    return self.length

  def __iter__(self):
    return (self.batches[i % len(self.batches)] for i in range(self.length))


def _torchvision_stand_in():
  """An empty torchvision (the original imports it for names it does not use on a CIFAR ResNet)."""
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return
  except Exception:  # pylint: disable=broad-except
    pass
  tv = types.ModuleType('torchvision')
  models = types.ModuleType('torchvision.models')
  resnet = types.ModuleType('torchvision.models.resnet')
  resnet.Bottleneck = type('Bottleneck', (nn.Module,), {})
  transforms = types.ModuleType('torchvision.transforms')
  datasets = types.ModuleType('torchvision.datasets')
  tv.models, tv.transforms, tv.datasets, models.resnet = models, transforms, datasets, resnet
  sys.modules.update({'torchvision': tv, 'torchvision.models': models, 'torchvision.models.resnet': resnet,
                      'torchvision.transforms': transforms, 'torchvision.datasets': datasets})


def _missing_modules_stand_in():
  """The original's model/engine.py imports two modules its repository does not hold (checkpoint, misc),
  for names the fitness never calls."""
  for name, names in (('checkpoint', ('load_model',)), ('misc', ('read_hdf5', 'save_hdf5'))):
    try:
      __import__(name)
    except ImportError:
      module = types.ModuleType(name)
      for n in names:
        setattr(module, n, None)
      sys.modules[name] = module


def run_original(root, keep_fraction, tau, val_images, batch, seed, rng, extra_steps=0, tick=time.perf_counter):
  """One candidate of the original's learn_ranking_ea (resnet_ch_main.py), timed from the pruning to the
  restored baseline; its printing goes to stderr. extra_steps: then that many more SGD steps of the pruned
  model, each timed ('step_times'; not part of 'seconds'), for a per-step figure that one slow step does not
  move."""
  _torchvision_stand_in()
  _missing_modules_stand_in()
  for sub in ('', 'model'):
    path = os.path.join(root, sub)
    if path not in sys.path:
      sys.path.insert(0, path)
  from model.resnet_cifar import resnet_56  # pylint: disable=g-import-not-at-top
  from model.drives import test, train  # pylint: disable=g-import-not-at-top
  from pruner.fp_resnet import FilterPrunerResNet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  desc = io.BytesIO()
  torch.save(resnet_56(), desc)
  train_loader = Loader([random_batch(rng, batch, 10, 32) for _ in range(4)], max(tau, extra_steps) + 1)
  val_loader = [random_batch(rng, min(128, val_images - i), 10, 32) for i in range(0, val_images, 128)]

  def load():
    desc.seek(0)
    return torch.load(desc, weights_only=False).eval()

  model = load()
  pruner = FilterPrunerResNet(model, 'l1_weight', 10, 0.1, device='cpu')
  pruner.reset()
  pruner.model.eval()
  pruner.forward(torch.zeros((1, 3, 32, 32)))
  original_dist = pruner.filter_ranks.copy()
  std = {k: float(np.std(original_dist[k].numpy())) for k in original_dist}
  perturbation = [(float(np.exp(rng.normal())), float(rng.normal(0, std[k]))) for k in sorted(original_dist)]
  stdout, sys.stdout = sys.stdout, sys.stderr  # the original prints progress
  try:
    t0 = tick()
    pruner.pruning_with_transformations(original_dist, perturbation, keep_fraction)
    pruner.reset()
    pruner.model.eval()
    pruner.forward(torch.zeros((1, 3, 32, 32)))
    flops = pruner.cur_flops
    optimizer = torch.optim.SGD(pruner.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    t1 = tick()
    if tau > 0:  # as learn_ranking_ea
      train(pruner.model, train_loader, val_loader, optimizer, epochs=1, steps=tau, run_test=False, device='cpu')
    t2 = tick()
    _, loss = test(pruner.model, val_loader, device='cpu', get_loss=True)
    t3 = tick()
    step_times = []  # not part of the candidate
    pruner.model.train()
    for x, y in list(train_loader)[:extra_steps]:
      s0 = tick()
      train_step(pruner.model, optimizer, x, y)
      step_times.append(tick() - s0)
    t3b = tick()
    model = load()
    pruner.model = model
    pruner.reset()
    pruner.model.eval()
    pruner.forward(torch.zeros((1, 3, 32, 32)))
    t4 = tick()
  finally:
    sys.stdout = stdout
  return {'seconds': (t3 - t0) + (t4 - t3b), 'prune_s': t1 - t0, 'train_s': t2 - t1, 'val_s': t3 - t2,
          'restore_s': t4 - t3b, 'loss': float(np.mean(loss)), 'flops': float(flops), 'step_times': step_times}


def serve() -> None:
  server = Server()
  for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop('op')
    if op == 'quit':
      break
    try:
      out = getattr(server, op)(**cmd)
    except Exception as e:  # pylint: disable=broad-except
      out = {'error': f'{type(e).__name__}: {e}'}
    print(json.dumps(out), flush=True)


if __name__ == '__main__':
  torch.set_num_threads(int(os.environ.get('TORCH_THREADS', os.cpu_count() or 1)))
  serve()
