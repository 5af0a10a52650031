"""Defaults shared by every experiment config (the original's recipes, METHOD.md); each config file
overrides what its experiment changes. Every key a run reads is declared here, so a misspelled override
(`--config.train.epoch=3`) is an error instead of a silent no-op."""
import ml_collections


def optimizer_section(*, learning_rate: float, optimizer: str = 'sgd', momentum: float = 0.9,
                      nesterov: bool = True, weight_decay: float = 5e-4, schedule: str = 'cosine',
                      step_fractions=(0.3, 0.6, 0.8), step_factor: float = 0.2, epochs: int = 1,
                      batch_size: int = 128, eval_batch_size=500, precise_bn_batches: int = 0,
                      distill_weight: float = 0.0, distill_temperature: float = 4.0,
                      groups=None) -> ml_collections.ConfigDict:
  """The one shape of every training section (train, finetune, search's fine-tune, codeq), read by
  training.fit / training.make_optimizer as plain attributes.

  optimizer: 'sgd' (momentum, nesterov; L2 decay added to the gradient) | 'adamw' (decoupled decay).
  schedule: 'cosine' | 'step' (x step_factor at step_fractions of all steps) | 'constant'.
  precise_bn_batches: recompute BatchNorm statistics on this many training batches before each validation
  (0: off). distill_weight / distill_temperature: distillation from the dense baseline (0: off).
  groups: parameter groups, name -> {learning_rate, weight_decay, leaves}: `leaves` names the parameter
  leaves of the group (e.g. ('logit_dz',)); the one group with no leaves takes every other parameter. Empty:
  one group, learning_rate and weight_decay above. eval_batch_size may be a FieldReference.
  """
  c = ml_collections.ConfigDict()
  c.optimizer = optimizer
  c.learning_rate = learning_rate
  c.momentum = momentum
  c.nesterov = nesterov
  c.weight_decay = weight_decay
  c.schedule = schedule
  c.step_fractions = tuple(step_fractions)
  c.step_factor = step_factor
  c.epochs = epochs
  c.batch_size = batch_size
  c.eval_batch_size = eval_batch_size
  c.precise_bn_batches = precise_bn_batches
  c.distill_weight = distill_weight
  c.distill_temperature = distill_temperature
  c.groups = ml_collections.ConfigDict(groups or {})
  return c


def parameter_group(learning_rate, weight_decay, leaves=()) -> ml_collections.ConfigDict:
  """One entry of `optimizer_section(groups=...)`; learning_rate / weight_decay may be FieldReferences."""
  g = ml_collections.ConfigDict()
  g.learning_rate = learning_rate
  g.weight_decay = weight_decay
  g.leaves = tuple(leaves)
  return g


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # A stage whose saved result may be discarded and computed again when it (or a later stage) was computed
  # from other settings: 'baseline', the method's section (e.g. 'search'), 'finetune', 'export' or 'report'.
  # Empty: such a mismatch stops the run (picpq_jax/fingerprints.py).
  c.recompute = ''

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.download = False  # nothing downloads unless asked: offline machines would hang in tfds
  c.data.val_size = 5000  # held out from the training split; the test split is never used for choices
  c.data.test_size = 500  # mnist5k only (the other datasets have their own test split)
  c.data.train_size = ml_collections.FieldReference(None, field_type=int)  # mnist5k only; None: all the rest
  c.data.augment = 'crop_flip'
  c.data.image_size = 32
  c.data.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'resnet56'

  # The compression method (picpq_jax/methods/): 'picpq' (the search), 'uniform', 'codeq'. Each method reads
  # its own section below (picpq: `search`; uniform: `uniform`; codeq: `codeq`); `finetune` and `export`
  # serve every method.
  c.method = ml_collections.ConfigDict()
  c.method.name = 'picpq'

  # The baseline every paper compares with (methods/uniform.py): the same fraction of each prunable layer's
  # channels kept (largest filter L1; a chain keeps one mask) and one bit-width for the weights and
  # activations of every layer whose B_max is below 32 (the others stay 32-bit, as for every method).
  c.uniform = ml_collections.ConfigDict()
  c.uniform.keep_fraction = 0.5  # of each layer's output channels
  c.uniform.bits = 4

  # Dense baseline training.
  c.train = optimizer_section(epochs=200, batch_size=128, eval_batch_size=500, learning_rate=0.1, momentum=0.9,
                              nesterov=True, weight_decay=5e-4, schedule='cosine')
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
  # The fine-tune inside the fitness (fitness.search_optimizer): the training-section shape; it reads the
  # optimizer keys (constant learning rate), `tau` steps instead of epochs.
  c.search.update(optimizer_section(batch_size=128, learning_rate=0.01, momentum=0.9, nesterov=False,
                                    weight_decay=5e-4, schedule='constant'))
  c.search.val_batch_size = 500  # the fitness reads floor(val_size / val_batch_size) validation batches
  c.search.chunk_size = 1  # candidates per chunk on each device (memory bound of the vmapped mode)
  # 'vmap' | 'map' | 'host' | 'sliced' (CPU: the kept channels only) | 'auto' ('vmap' on GPU/TPU; on CPU
  # 'sliced' from tau 50 on without search.quantize, else 'host'); picpq_jax/fitness.py.
  c.search.eval_mode = 'auto'
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
  # Where (a, b) comes from: 'search' (the evolution above), 'identity' (a = 1, b = 0: the plain filter
  # property ranked globally, no search), or 'reuse' (the best (a, b) of the search in ranking_workdir, found
  # on the same baseline: one learned ranking serves every target, as in LeGR).
  c.search.ranking = 'search'
  c.search.ranking_workdir = ''
  # A BOPs target instead of a FLOPs one (0 = off): the largest keep fraction on a grid of this step whose
  # policy, with its bits, has at least bops_ratio times fewer BOPs than the dense FP32 model. The search
  # itself still runs at keep_fraction.
  c.search.bops_ratio = 0.0
  c.search.bops_step = 0.01
  return add_finetune_config(c)


def add_finetune_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fine-tuning of the found policy: full precision with masks, then activations quantized, then weights
  and activations; each stage starts from the previous stage's best validation checkpoint. The original:
  400 epochs each, SGD Nesterov lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, lr x0.2 at 30/60/80 %."""
  # The training-section shape; `epochs` is set per stage from the three counts below.
  c.finetune = optimizer_section(batch_size=128, eval_batch_size=c.train.get_ref('eval_batch_size'),
                                 learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                 schedule='step', step_fractions=(0.3, 0.6, 0.8), step_factor=0.2)
  c.finetune.enabled = True  # search.py runs the stages after the search
  c.finetune.fp_epochs = 400
  c.finetune.act_epochs = 400
  c.finetune.weight_act_epochs = 400
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
  # The seed of the fine-tuning stages (data order); None takes `seed`. compare.py repeats them with others.
  c.finetune.seed = ml_collections.FieldReference(None, field_type=int)
  return add_codeq_config(add_export_config(c))


def add_codeq_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CoDeQ (BASELINES.md, "CoDeQ"; picpq_jax/methods/codeq.py): quantization-aware training of the baseline
  with learned dead zones (the pruning) and bit-widths, then the policy read out.

  [code: README] AdamW in three parameter groups, each with its own learning rate and weight decay: the
  network's weights, the dead-zone logits ('logit_dz'), the bit logits ('logit_bit'). The public code gives
  no values; [ours]: weights at AdamW's usual 1e-3 with weight decay 5e-4 (the baseline's), cosine schedule;
  the logits at a larger learning rate (they are scalars starting at 3.0, where tanh is flat). The dead-zone
  logits' weight decay is the sparsity knob (decay pulls theta_dz to 0, the widest dead zone); the bit
  logits' decay the mixed-precision knob (pulls towards 2 bits; 0 leaves the bits near max_bits).
  max_bits 8 [code default]; fixed_bits None = learned bits [paper's mixed precision] (an int: every layer at
  that many bits, the paper's fixed-precision runs). act_bits 32: activations not quantized [code]; < 32
  quantizes the convs' inputs with PIC-PQ's activation quantizer [ours, for the like-for-like table].
  end_bits 32 [ours]: the stem conv and the classifier stay full precision, PIC-PQ's convention (BASELINES.md,
  "A common cost ledger"), so that CoDeQ and PIC-PQ are compared on the same layers; 0 quantizes them like
  every other layer, as published [paper, code]; 2..31 fixes them at that many bits.
  """
  c.codeq = optimizer_section(optimizer='adamw', learning_rate=1e-3, weight_decay=5e-4, schedule='cosine',
                              epochs=30, batch_size=128, eval_batch_size=c.train.get_ref('eval_batch_size'))
  c.codeq.groups = ml_collections.ConfigDict({
      'weights': parameter_group(c.codeq.get_ref('learning_rate'), c.codeq.get_ref('weight_decay')),
      'dead_zone': parameter_group(1e-2, 1.0, leaves=('logit_dz',)),
      'bits': parameter_group(1e-2, 0.0, leaves=('logit_bit',)),
  })
  c.codeq.max_bits = 8
  c.codeq.fixed_bits = ml_collections.FieldReference(None, field_type=int)
  c.codeq.act_bits = 32
  c.codeq.end_bits = 32
  return add_djpq_config(add_opq_config(c))


def add_opq_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """OPQ-style (BASELINES.md, "OPQ"; picpq_jax/methods/opq.py): one-shot allocation of weight masks and bits
  from the baseline's weights, then the shared fine-tuning with masks and steps frozen.

  [ours] sparsity: the global fraction P of the allocated convs' weights pruned (one magnitude threshold from
  a Laplace fit); avg_bits: the average weight bits of the surviving weights (one global step). Both budgets
  are over the convs whose B_max is below 32; the stem and classifier stay 32-bit (PIC-PQ's convention).
  act_bits 32: activations not quantized [paper]; < 32 uses PIC-PQ's activation quantizer [ours].
  """
  c.opq = ml_collections.ConfigDict()
  c.opq.sparsity = 0.8
  c.opq.avg_bits = 4.0
  c.opq.act_bits = 32
  return c


def add_export_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The slimmed, integer-coded export written after fine-tuning (picpq_jax/export.py)."""
  c.export = ml_collections.ConfigDict()
  c.export.fold_bn = False  # True: store each conv's BatchNorm folded into a per-channel scale and shift
  # Test images on which the loaded export's logits are compared with the masked model's (0: no check).
  c.export.check_images = 100
  return c


def add_djpq_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DJPQ (BASELINES.md, "DJPQ"; picpq_jax/methods/djpq.py): VIB channel gates and DQ's learned steps trained
  with the baseline's weights against a BOPs target, then read out to PIC-PQ's masks and bits.

  [code: VIBNet] gates mu ~ N(1, 0.01), log sigma^2 ~ N(-9, 0.01), pruned where log alpha >= gate_threshold (0),
  the KL with kl_mult = 1/H; gamma ~ 1e-5. [code: DQ] weight step in [2^-8, 1], init for init_bits bits.
  [ours] loss = cross-entropy + gamma KL + beta relu(BOPs / BOPs_dense - 1 / target_bops_ratio)^2; the kept
  channels' sigmoid surrogate at surrogate_temperature; weights by SGD (the fine-tuning's recipe), gates and
  DQ parameters by Adam 1e-3 (AdamW without decay), in three groups, the section's schedule scaling each;
  bits kept in min_bits..max_bits (2..8), init_bits 8; restrict: DJPQ-restrict (bits snapped up to powers of
  two) [paper's variant, our snapping]; target_bops_ratio = dense FP32 BOPs / compressed BOPs, 50 (the
  paper's ResNet-18 figure is 53x).
  """
  c.djpq = optimizer_section(optimizer='sgd', learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                             schedule='cosine', epochs=30, batch_size=128, precise_bn_batches=4,
                             eval_batch_size=c.train.get_ref('eval_batch_size'))
  groups = {
      'weights': parameter_group(c.djpq.get_ref('learning_rate'), c.djpq.get_ref('weight_decay')),
      'gates': parameter_group(1e-3, 0.0, leaves=('mu', 'log_sigma2')),
      'quantizer': parameter_group(1e-3, 0.0, leaves=('w_step', 'w_range', 'a_step', 'a_range')),
  }
  groups['weights'].optimizer = c.djpq.get_ref('optimizer')
  groups['gates'].optimizer = 'adamw'
  groups['quantizer'].optimizer = 'adamw'
  c.djpq.groups = ml_collections.ConfigDict(groups)
  c.djpq.target_bops_ratio = 50.0
  c.djpq.gamma = 1e-5
  c.djpq.beta = 1e3
  c.djpq.gate_threshold = 0.0
  c.djpq.surrogate_temperature = 1.0
  c.djpq.init_bits = 8
  c.djpq.min_bits = 2
  c.djpq.max_bits = 8
  c.djpq.restrict = False
  return c
