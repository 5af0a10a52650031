"""MobileNetV2 (CIFAR variant) on CIFAR-100, as the paper's MobileNetV2 experiment.

  python search.py --config configs/mobilenetv2_cifar100.py --workdir runs/mobilenetv2_cifar100  # whole pipeline
  python train.py --config configs/mobilenetv2_cifar100.py --workdir runs/mobilenetv2_cifar100   # baseline only

Follows the original's mbv2_ch_main.py (fanxxxxyi/PIC-PQ): prune_away 50, i.e. keep 50 % of the FLOPs;
tau_hat 200; batch_size 64, which the original uses for every loader, so both the fitness's fine-tune
(search.batch_size) and the fine-tuning stages (finetune.batch_size); lr 0.01, weight decay 5e-4, safeguard
0.1, lambda 1/6 (our defaults); B_max [32] + [6]*17 + [4]*30 + [3]*3 + [32] (its qbw_upper, the MobileNetV2
builder's own list, models/mobilenetv2.py; the last 32 is the last 1x1 conv, kept in full precision).
Fine-tuning: its long_ft, 200 epochs of the pruned model in full precision, is finetune.fp_epochs; its
epoch_qt, hard-coded to 400, is each of the two quantized stages (finetune.act_epochs: activations quantized;
finetune.weight_act_epochs: weights and activations). The original loads a trained baseline; ours trains one
(train.*).
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'cifar100'
  c.model.arch = 'mobilenetv2'
  c.train.weight_decay = 4e-4  # CIFAR MobileNetV2 recipes decay more than ImageNet's 4e-5
  c.search.keep_fraction = 0.5  # prune_away 50
  c.search.tau = 200
  c.search.batch_size = 64
  c.finetune.batch_size = 64
  c.finetune.fp_epochs = 200  # long_ft
  c.finetune.act_epochs = 400  # epoch_qt
  c.finetune.weight_act_epochs = 400  # epoch_qt
  return c
