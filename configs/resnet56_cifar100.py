"""ResNet-56 on CIFAR-100.

  python train.py --config configs/resnet56_cifar100.py --workdir runs/resnet56_cifar100
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'cifar100'
  c.model.arch = 'resnet56'
  return c
