"""Defaults shared by every experiment config (the original's recipes, METHOD.md); each config file
overrides what its experiment changes. Every key a run reads is declared here, so a misspelled override
(`--config.train.epoch=3`) is an error instead of a silent no-op."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.download = False  # nothing downloads unless asked: offline machines would hang in tfds
  c.data.val_size = 5000  # held out from the training split; the test split is never used for choices
  c.data.test_size = 500  # mnist5k only (the other datasets have their own test split)
  c.data.augment = 'crop_flip'
  c.data.image_size = 32
  c.data.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'resnet56'

  # Dense baseline training.
  c.train = ml_collections.ConfigDict()
  c.train.epochs = 200
  c.train.batch_size = 128
  c.train.eval_batch_size = 500
  c.train.learning_rate = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.weight_decay = 5e-4
  c.train.schedule = 'cosine'
  c.train.step_fractions = (0.3, 0.6, 0.8)
  c.train.step_factor = 0.2
  return add_search_config(c)


def add_search_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The PIC-PQ search (METHOD.md, stages 2-6) with the original's settings."""
  c.search = ml_collections.ConfigDict()
  c.search.criterion = 'rank'  # filter property: 'rank' | 'l1' | 'l2' | 'bn_gamma'
  c.search.calibration_batches = 6  # 6 x 128 training images for the feature-map rank
  c.search.calibration_batch_size = 128
  c.search.keep_fraction = 0.45  # FLOPs target: keep 45 % of the dense MACs (ResNet-56 / CIFAR-10)
  c.search.safeguard = 0.1
  c.search.check_every = 1  # 10 reproduces the original's plans exactly
  c.search.strategy = 'aging_evolution'
  c.search.population = 64
  c.search.tournament = 16
  c.search.total_evaluations = 400  # the initial population included
  c.search.num_children = 1  # K children per round; 1 is the original algorithm
  c.search.tau = 200  # SGD steps of the fine-tune inside the fitness
  c.search.batch_size = 128
  c.search.learning_rate = 0.01
  c.search.momentum = 0.9
  c.search.nesterov = False
  c.search.weight_decay = 5e-4
  c.search.val_batch_size = 500  # the fitness reads floor(val_size / val_batch_size) validation batches
  c.search.chunk_size = 1  # candidates per chunk on each device (memory bound of the vmapped mode)
  c.search.eval_mode = 'auto'  # 'vmap' | 'map' | 'auto' ('map' on CPU, 'vmap' on GPU/TPU)
  c.search.quantize = False  # fine-tune inside the fitness with the assigned bits (the original does not)
  # A candidate whose pruning plan equals an evaluated one takes its loss without running (fitness.PlanCache;
  # ours, the result is the same). False evaluates every candidate, as the original does.
  c.search.cache_plans = True
  c.search.bit_penalty = 1 / 6  # lambda of bits = B_max - ceil(lambda / s)
  c.search.min_bits = 2
  # B_max, the available maximum bit-width of each prunable conv: None takes the architecture's own list
  # (picpq_jax/models/, the original's per-layer lists where it has one); or one integer in 1..32 per
  # prunable conv in forward order, e.g. --config.search.b_max='(32, 8, 8, ...)'. 32 = full precision.
  c.search.b_max = ml_collections.FieldReference(None, field_type=tuple)
  return add_finetune_config(c)


def add_finetune_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fine-tuning of the found policy: full precision with masks, then activations quantized, then weights
  and activations; each stage starts from the previous stage's best validation checkpoint. The original:
  400 epochs each, SGD Nesterov lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, lr x0.2 at 30/60/80 %."""
  c.finetune = ml_collections.ConfigDict()
  c.finetune.enabled = True  # search.py runs the stages after the search
  c.finetune.fp_epochs = 400
  c.finetune.act_epochs = 400
  c.finetune.weight_act_epochs = 400
  c.finetune.batch_size = 128
  c.finetune.eval_batch_size = c.train.get_ref('eval_batch_size')
  c.finetune.learning_rate = 0.01
  c.finetune.momentum = 0.9
  c.finetune.nesterov = True
  c.finetune.weight_decay = 5e-4
  c.finetune.schedule = 'step'
  c.finetune.step_fractions = (0.3, 0.6, 0.8)
  c.finetune.step_factor = 0.2
  # Before the quantized stages, scale all activations so that this percentile of the quantized convs' inputs
  # sits at the top of the activation quantizer's fixed range [0, 1] (calibration.py; not in the original).
  c.finetune.calibrate_activations = True
  c.finetune.calibration_percentile = 99.9
  # Before each validation, replace the BatchNorm running statistics by the mean batch statistics of this
  # many (un-augmented) training batches: quantized weights flip from step to step, and the running averages
  # lag them (training.precise_batch_stats; not in the original). 0 keeps the running averages.
  c.finetune.precise_bn_batches = 8
  # Knowledge distillation from the dense baseline (not in the original): the loss is
  # (1 - w) * cross-entropy + w * T^2 KL(teacher || student) at temperature T; w = 0 turns it off.
  c.finetune.distill_weight = 0.0
  c.finetune.distill_temperature = 4.0
  return add_export_config(c)


def add_export_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The slimmed, integer-coded export written after fine-tuning (picpq_jax/export.py)."""
  c.export = ml_collections.ConfigDict()
  c.export.fold_bn = False  # True: store each conv's BatchNorm folded into a per-channel scale and shift
  # Test images on which the loaded export's logits are compared with the masked model's (0: no check).
  c.export.check_images = 100
  return c
