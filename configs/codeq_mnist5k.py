"""CoDeQ on the offline demo: ResNet-20 on the bundled MNIST-5k digits, from the same baseline the demo trains.

  python search.py --config configs/codeq_mnist5k.py --workdir runs/codeq_demo

Data, model and baseline training are configs/demo_mnist5k.py's (a workdir holding the demo's baseline is
reused as is). CoDeQ's training is its quantization-aware training, so there is no separate fine-tuning.

Whose choices: the quantizer, AdamW in three groups (weights, dead-zone logits, bit logits), max_bits 8, the
logits' init 3.0 and 32-bit activations are the paper's / code's (BASELINES.md, "CoDeQ"). Ours: the epochs,
learning rates and weight decays (the public code gives none), the cosine schedule, end_bits 32 (stem and
classifier full precision, PIC-PQ's convention, for the like-for-like table; `--config.codeq.end_bits=0`
quantizes them as published), starting from the dense baseline with the best validation epoch kept, and
precise BatchNorm statistics before each validation.

Measured on a 2-core AMD EPYC (AVX2), 2026-12-01, from the demo's baseline (97.40 % test): 3 min 50 s for
the 6 epochs, readout, evaluation and export; 77.9 % of the quantized conv weights zero; 7 bits in 17 convs
and 6 in one (bit decay 1.0); test 97.40 % (no drop), validation 97.4 %; 4.53x fewer BOPs (activations
stay 32-bit, as published), 20.7x fewer sparse BOPs, 19.8x fewer weight bits. More sparsity: raise
--config.codeq.groups.dead_zone.weight_decay (1.5 gave 44.8 % zeros); fewer bits: raise
--config.codeq.groups.bits.weight_decay (0.05 left every conv at 8 bits).
"""
from configs import demo_mnist5k


def get_config():
  c = demo_mnist5k.get_config()
  c.method.name = 'codeq'
  c.finetune.enabled = False  # CoDeQ's training is its quantization-aware training
  c.codeq.epochs = 6
  c.codeq.batch_size = 128
  c.codeq.learning_rate = 1e-3
  # Quantized weights flip between steps and the BatchNorm running averages lag them (training.py,
  # precise_batch_stats): after one epoch, 96 % training but 76 % validation accuracy without this.
  c.codeq.precise_bn_batches = 4
  c.codeq.groups.dead_zone.learning_rate = 1e-2
  c.codeq.groups.dead_zone.weight_decay = 2.5
  c.codeq.groups.bits.learning_rate = 1e-2
  c.codeq.groups.bits.weight_decay = 1.0
  return c
