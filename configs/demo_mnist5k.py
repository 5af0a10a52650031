"""Offline demo: ResNet-20 on the bundled MNIST-5k digits, small enough for a 2-core CPU.

  python search.py --config configs/demo_mnist5k.py --workdir runs/demo   # the whole pipeline
  python train.py --config configs/demo_mnist5k.py --workdir runs/demo    # the dense baseline only
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'mnist5k'
  c.data.val_size = 500
  c.data.test_size = 500
  c.data.augment = 'crop'  # digits: no flips
  c.model.arch = 'resnet20'
  c.train.epochs = 6
  c.train.learning_rate = 0.05
  c.train.eval_batch_size = 250
  # A small search: 12 candidates, 32 evaluations, 12 fine-tune steps each. Keeping 60 % of the FLOPs still
  # gives > 30x fewer BOPs (the bits do most of it) and leaves the few fine-tune epochs less to recover.
  c.search.keep_fraction = 0.6
  c.search.population = 12
  c.search.tournament = 4
  c.search.total_evaluations = 32
  c.search.tau = 12
  c.search.batch_size = 64
  c.search.val_batch_size = 250
  c.search.calibration_batches = 2
  c.finetune.fp_epochs = 3
  c.finetune.act_epochs = 1
  c.finetune.weight_act_epochs = 3
  c.finetune.schedule = 'cosine'  # few epochs: decay smoothly instead of the original's steps
  return c
