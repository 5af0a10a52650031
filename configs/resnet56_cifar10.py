"""ResNet-56 on CIFAR-10, the paper's headline (54.96x fewer BOPs for a 0.10 % drop).

  python search.py --config configs/resnet56_cifar10.py --workdir runs/resnet56_cifar10   # the whole pipeline
  python train.py --config configs/resnet56_cifar10.py --workdir runs/resnet56_cifar10    # the baseline only

Follows the original's resnet_main.py (fanxxxxyi/PIC-PQ): prune_away 55, i.e. keep 45 % of the FLOPs;
tau_hat 200 SGD steps (batch 128, lr 0.01, weight decay 5e-4) inside the fitness; B_max [32] + [8]*18 +
[6]*18 + [4]*18 (the ResNet builder's own list, models/resnet_cifar.py); safeguard 0.1; lambda 1/6.
Fine-tuning: the original's long_ft (400 epochs, the pruned model in full precision) is finetune.fp_epochs;
its epoch_qt (400, commented out in resnet_main.py, live in the other scripts) is each of the two quantized
stages, finetune.act_epochs (activations quantized) and finetune.weight_act_epochs (weights too). All of
these are the defaults of configs/common.py, which this config states again so that it reads as the paper's.
"""
from configs import common


def get_config():
  c = common.base_config()
  c.model.arch = 'resnet56'
  c.search.keep_fraction = 0.45  # prune_away 55
  c.search.tau = 200
  c.finetune.fp_epochs = 400  # long_ft
  c.finetune.act_epochs = 400  # epoch_qt
  c.finetune.weight_act_epochs = 400  # epoch_qt
  return c
