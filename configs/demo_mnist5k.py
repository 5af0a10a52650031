"""Offline demo: ResNet-20 on the bundled MNIST-5k digits, small enough for a 2-core CPU.

  python train.py --config configs/demo_mnist5k.py --workdir runs/demo
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'mnist5k'
  c.data.val_size = 500
  c.data.test_size = 500
  c.data.augment = 'crop'  # digits: no flips
  c.model.arch = 'resnet20'
  c.train.epochs = 8
  c.train.learning_rate = 0.05
  c.train.eval_batch_size = 250
  return c
