"""VGG-16-BN on CIFAR-10.

  python train.py --config configs/vgg16_cifar10.py --workdir runs/vgg16_cifar10
"""
from configs import common


def get_config():
  c = common.base_config()
  c.model.arch = 'vgg16'
  c.train.learning_rate = 0.05
  return c
