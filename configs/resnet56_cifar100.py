"""ResNet-56 on CIFAR-100, as the paper's ResNet-56 / CIFAR-100 experiment.

  python search.py --config configs/resnet56_cifar100.py --workdir runs/resnet56_cifar100   # the whole pipeline
  python train.py --config configs/resnet56_cifar100.py --workdir runs/resnet56_cifar100    # the baseline only

Follows the original's resnet_ch_main.py (fanxxxxyi/PIC-PQ): prune_away 30, i.e. keep 70 % of the FLOPs;
tau_hat 50; B_max [32] + [8]*18 + [6]*18 + [4]*18 (its qbw_upper, the ResNet builder's own list,
models/resnet_cifar.py); batch 128, lr 0.01, weight decay 5e-4, safeguard 0.1, lambda 1/6 (our defaults).
Fine-tuning: its long_ft, 60 epochs of the pruned model in full precision, is finetune.fp_epochs; its
epoch_qt, hard-coded to 400, is each of the two quantized stages (finetune.act_epochs: activations quantized;
finetune.weight_act_epochs: weights and activations).
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.name = 'cifar100'
  c.model.arch = 'resnet56'
  c.search.keep_fraction = 0.7  # prune_away 30
  c.search.tau = 50
  c.finetune.fp_epochs = 60  # long_ft
  c.finetune.act_epochs = 400  # epoch_qt
  c.finetune.weight_act_epochs = 400  # epoch_qt
  return c
