"""ResNet-18 on ImageNet (ILSVRC-2012, prepared by tensorflow-datasets under data.data_dir; manual download).

  python train.py --config configs/resnet18_imagenet.py --workdir runs/resnet18_imagenet \
      --config.data.data_dir=/path/to/tensorflow_datasets
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'imagenet2012'
  c.data.image_size = 224
  c.data.augment = 'imagenet'
  c.data.val_size = 10000
  c.model.arch = 'resnet18'
  c.train.epochs = 90
  c.train.batch_size = 256
  c.train.learning_rate = 0.1
  c.train.weight_decay = 1e-4
  c.train.nesterov = False
  c.train.schedule = 'step'
  c.train.step_fractions = (1 / 3, 2 / 3, 8 / 9)  # epochs 30, 60, 80
  c.train.step_factor = 0.1
  c.train.eval_batch_size = 250
  return c
