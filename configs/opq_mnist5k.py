"""OPQ-style on the offline demo: ResNet-20 on the bundled MNIST-5k digits, from the same baseline the demo trains.

  python search.py --config configs/opq_mnist5k.py --workdir runs/opq_demo

Data, model and baseline training are configs/demo_mnist5k.py's (a workdir holding the demo's baseline is
reused as is). The method allocates from the baseline's weights alone (picpq_jax/methods/opq.py, well under a
second), then the shared fine-tuning trains the weights with masks and steps frozen, weights quantized with
straight-through rounding from the first epoch (one stage: finetune_weight_act).

Whose choices: one-shot allocation from the pretrained weights, weight-level magnitude masks, one step per
layer, unified channel-wise quantization, frozen allocation with STE fine-tuning, 32-bit activations are the
paper's (BASELINES.md, "OPQ"). Everything else is ours and named "OPQ-style": the Laplace fit b = mean|W|, the one
global threshold and the one global step found by bisection, r_l measured before the channel scaling, bits
clamped to 2..16, the budgets (80 % of the allocated convs' weights pruned, 4 average bits over the
survivors), the stem and classifier dense at 32 bits (PIC-PQ's convention), the fine-tuning recipe (the demo's:
SGD Nesterov, cosine, 3 epochs, precise BatchNorm statistics).

Measured on the 2-core CPU from the demo's baseline (97.40 % test): 5 min 4 s in all (allocation < 0.1 s, the
3 epochs 3 min 57 s, evaluation and export). 80.2 % of the 18 allocated convs' weights pruned (Laplace model:
80.0 %; per stage 52 / 69 / 85 %), every allocated conv at 4 bits (the global step gave no layer another
bit-width on these weights); test 97.20 % (drop 0.20 points), validation 96.4 %; 36.2x fewer weight bits
(the paper's figure), 23.1x fewer sparse BOPs, 7.80x fewer BOPs (activations 32-bit, as published).
"""
from configs import demo_mnist5k


def get_config():
  c = demo_mnist5k.get_config()
  c.method.name = 'opq'
  c.opq.sparsity = 0.8
  c.opq.avg_bits = 4.0
  c.opq.act_bits = 32
  # OPQ fine-tunes with the whole allocation frozen at once: no full-precision or activation-only stage.
  c.finetune.fp_epochs = 0
  c.finetune.act_epochs = 0
  c.finetune.weight_act_epochs = 3
  c.finetune.calibrate_activations = False  # activations stay 32-bit: nothing to fit into [0, 1]
  return c
