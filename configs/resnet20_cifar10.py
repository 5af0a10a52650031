"""ResNet-20 on CIFAR-10.

  python train.py --config configs/resnet20_cifar10.py --workdir runs/resnet20_cifar10
"""
from configs import common


def get_config():
  c = common.base_config()
  c.model.arch = 'resnet20'
  return c
