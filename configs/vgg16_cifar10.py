"""VGG-16-BN on CIFAR-10, as the paper's VGG-16 experiment.

  python search.py --config configs/vgg16_cifar10.py --workdir runs/vgg16_cifar10   # the whole pipeline
  python train.py --config configs/vgg16_cifar10.py --workdir runs/vgg16_cifar10    # the baseline only

Follows the original's vgg_main.py (fanxxxxyi/PIC-PQ): prune_away 65.3, i.e. keep 34.7 % of the FLOPs;
tau_hat 200; B_max [32] + [8]*3 + [6]*3 + [4]*6 (its qbw_upper, the VGG builder's own list, models/vgg.py);
batch 128, lr 0.01, weight decay 5e-4, safeguard 0.1, lambda 1/6 (our defaults already). Fine-tuning: its
long_ft, 160 epochs of the pruned model in full precision, is finetune.fp_epochs; its epoch_qt, hard-coded
to 400, is each of the two quantized stages (finetune.act_epochs: activations quantized;
finetune.weight_act_epochs: weights and activations). The original loads a trained baseline; ours trains one
(train.*, with our learning rate below).
"""
from configs import common


def get_config():
  c = common.base_config()
  c.model.arch = 'vgg16'
  c.train.learning_rate = 0.05  # the baseline's, ours (the original starts from a trained checkpoint)
  c.search.keep_fraction = 0.347  # prune_away 65.3
  c.search.tau = 200
  c.finetune.fp_epochs = 160  # long_ft
  c.finetune.act_epochs = 400  # epoch_qt
  c.finetune.weight_act_epochs = 400  # epoch_qt
  return c
