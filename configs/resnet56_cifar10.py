"""ResNet-56 on CIFAR-10 (the paper's headline: 54.96x BOPs compression for a 0.10 % drop).

  python train.py --config configs/resnet56_cifar10.py --workdir runs/resnet56_cifar10
"""
from configs import common


def get_config():
  c = common.base_config()
  c.model.arch = 'resnet56'
  return c
