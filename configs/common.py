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
  return c
