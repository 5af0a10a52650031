"""MobileNetV2 (CIFAR variant) on CIFAR-100.

  python train.py --config configs/mobilenetv2_cifar100.py --workdir runs/mobilenetv2_cifar100
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'cifar100'
  c.model.arch = 'mobilenetv2'
  c.train.weight_decay = 4e-4  # CIFAR MobileNetV2 recipes decay more than ImageNet's 4e-5
  return c
