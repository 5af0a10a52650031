"""What the entry points share: config checks, and turning a user's mistake into one sentence and exit 2."""
from __future__ import annotations

import functools
import math
import os
import re
import sys
from typing import Optional

import ml_collections
import numpy as np

from picpq_jax import checkpoints

# Errors that mean "the input is wrong": reported as one sentence, no traceback (PICPQ_DEBUG=1 shows it).
USER_ERRORS = (ValueError, OSError, FloatingPointError, checkpoints.CheckpointMismatchError)


def report_user_errors(main):
  """Wrap an absl main: user errors become `error: <sentence>` and exit 2; library chatter is silenced."""
  @functools.wraps(main)
  def wrapped(argv):
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      return main(argv)
    except USER_ERRORS as e:
      if os.environ.get('PICPQ_DEBUG'):
        raise
      print(f'error: {one_line(e)}', file=sys.stderr)
      sys.exit(2)
  return wrapped


def one_line(error: BaseException) -> str:
  """The error's message on one line (a library's message may span several)."""
  return ' '.join(str(error).split()) or type(error).__name__


def config_file_argument(argv: list[str]) -> Optional[str]:
  """The file of the last `--config FILE` / `--config=FILE` in argv (the one absl takes; without a `:argument`
  suffix), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith('--config='):
      value = arg.split('=', 1)[1]
  if value is None or os.path.exists(value) or ':' not in value:
    return value
  return value.rsplit(':', 1)[0]


def config_file_problem(path: str) -> Optional[str]:
  """One sentence when the config file at `path` cannot give a config: missing, not Python, without
  get_config(), or failing in it; None when it loads."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    return (f'the config file {path} (--config) does not exist; give one of the files in configs/, e.g. '
            'configs/demo_mnist5k.py.')
  try:
    spec = importlib.util.spec_from_file_location('picpq_config_check', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except SyntaxError as e:
    return f'the config file {path} (--config) has a syntax error at line {e.lineno}: {e.msg}; fix it.'
  except Exception as e:  # pylint: disable=broad-except  # the user's code: anything may go wrong
    return f'the config file {path} (--config) fails when it is loaded ({type(e).__name__}: {one_line(e)}); fix it.'
  if not callable(getattr(module, 'get_config', None)):
    return (f'the config file {path} (--config) defines no get_config() returning an ml_collections.ConfigDict '
            '(see configs/demo_mnist5k.py).')
  try:
    config = module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    return (f'the config file {path} (--config) fails in get_config() ({type(e).__name__}: {one_line(e)}); '
            'fix it.')
  if not isinstance(config, ml_collections.ConfigDict):
    return (f'the config file {path} (--config): get_config() returns a {type(config).__name__}, not an '
            'ml_collections.ConfigDict.')
  return None


def bad_overrides(argv: list[str], message: str) -> list[str]:
  """The `--config.` arguments a flag-parsing error message is about (all of them when it names none)."""
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  message = message.split('Did you mean')[0]  # absl's suggestions name valid keys
  for name in (lambda a: a.split('=')[0][2:], lambda a: a.split('=')[0].split('.')[-1]):  # whole key, then leaf
    named = [a for a in overrides if re.search(r'\b' + re.escape(name(a)) + r'\b', message)]
    if named:
      return named
  return overrides


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad `--config.x=y` override is one sentence and exit 2, not a traceback; so is
  an override of another method's settings (`--config.codeq.epochs=3` with method.name='picpq')."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  path = config_file_argument(argv[1:])
  problem = config_file_problem(path) if path else None
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    sys.exit(2)
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = ' '.join(re.sub(r'\\n|[\\\'"]', ' ', str(e)).split())
    missing = re.search(r'Flag --(\w+) must have a value', message)
    if missing:
      print(f'error: --{missing.group(1)} is required; run {os.path.basename(argv[0])} --help for what it '
            'means.', file=sys.stderr)
      sys.exit(2)
    bad = bad_overrides(argv, message)
    print(f'error: could not apply the command-line setting{"s" if len(bad) > 1 else ""} '
          f'{" ".join(bad or argv[1:])}: {message} (every key must exist in the config file; see '
          'configs/common.py).', file=sys.stderr)
    sys.exit(2)
  config = getattr(flags.FLAGS, 'config', None)
  # A comparison (compare.py) runs every method: there, each section is some row's to read.
  if config is not None and 'method' in config and 'compare' not in config:
    message = other_method_setting(config.method.name, argv[1:])
    if message:
      print(f'error: {message}', file=sys.stderr)
      sys.exit(2)
  return rest


def other_method_setting(method: str, args: list[str]):
  """One sentence if a `--config.<section>.<key>` argument sets a section of a method other than `method`."""
  from picpq_jax import methods  # pylint: disable=g-import-not-at-top
  owners = methods.sections()
  for arg in args:
    match = re.match(r'--config\.([A-Za-z_]\w*)\.', arg)
    if match and owners.get(match.group(1), method) != method:
      section = match.group(1)
      return (f'{arg.split("=")[0][2:]} is a setting of method {owners[section]!r}, but method.name={method!r} '
              f'does not read it; drop it, or add --config.method.name={owners[section]}.')
  return None


# ----------------------------------------------------------------------------------------------------------
# Config checks: each a ValueError of one sentence naming the key, what it is and what would work
# ----------------------------------------------------------------------------------------------------------

GENERAL_SECTIONS = ('data', 'model', 'method', 'train', 'search', 'finetune', 'export')  # search: its b_max
UNSHARDED_SECTIONS = ('search',)  # the search shards its population over the devices, not its batches
# Batch sizes and the split their batches come from; a method's section counts only for that method, and
# every method's own training section adds its batch_size against 'train' (check_batch_sizes).
BATCH_SPLITS = (('train.batch_size', 'train'), ('train.eval_batch_size', 'validation'),
                ('finetune.batch_size', 'train'), ('finetune.eval_batch_size', 'validation'),
                ('search.batch_size', 'train'), ('search.calibration_batch_size', 'train'),
                ('search.val_batch_size', 'validation'))


SPLIT_SOURCE = {'train': 'the training images data.val_size leaves', 'validation': 'data.val_size'}


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _require(ok: bool, key: str, value, rule: str) -> None:
  if not ok:
    raise ValueError(f'{key}={value!r} {rule}.')


def positive_int(value, key: str, meaning: str) -> None:
  _require(_is_int(value) and value >= 1, key, value, f'must be a positive integer: {meaning}')


def nonnegative_int(value, key: str, meaning: str) -> None:
  _require(_is_int(value) and value >= 0, key, value, f'must be an integer >= 0: {meaning}')


def finite_positive(value, key: str, meaning: str) -> None:
  _require(_is_number(value) and math.isfinite(value) and value > 0, key, value,
           f'must be a finite number > 0: {meaning}')


def finite_nonnegative(value, key: str, meaning: str) -> None:
  _require(_is_number(value) and math.isfinite(value) and value >= 0, key, value,
           f'must be a finite number >= 0: {meaning}')


def check_sections(config: ml_collections.ConfigDict) -> None:
  """Every section the run reads is in the config (a config file built without one fails here, not deep in a
  stage)."""
  from picpq_jax import methods  # pylint: disable=g-import-not-at-top
  for section in GENERAL_SECTIONS:
    if section not in config:
      raise ValueError(f'the config has no `{section}` section; build the config file from '
                       'configs/common.base_config(), which declares every section and key.')
  section = getattr(methods.get(config.method.name), 'SECTION', None)
  if section and section not in config:
    raise ValueError(f'the config has no `{section}` section, which method.name={config.method.name!r} reads; '
                     'build the config file from configs/common.base_config().')


def check_training_section(cfg: ml_collections.ConfigDict, key: str, sharded: bool = True) -> None:
  """The keys of a training section (configs/common.py, `optimizer_section`) at config key `key`."""
  from picpq_jax import training  # pylint: disable=g-import-not-at-top
  _require(cfg.optimizer in training.OPTIMIZERS, f'{key}.optimizer', cfg.optimizer,
           f'is not an optimizer; choose one of {list(training.OPTIMIZERS)}')
  finite_positive(cfg.learning_rate, f'{key}.learning_rate', 'the (peak) learning rate, e.g. 0.01')
  _require(_is_number(cfg.momentum) and 0 <= cfg.momentum < 1, f'{key}.momentum', cfg.momentum,
           'must lie in [0, 1), e.g. 0.9 (0: plain SGD)')
  finite_nonnegative(cfg.weight_decay, f'{key}.weight_decay', 'e.g. 5e-4 (0: none)')
  _require(cfg.schedule in training.SCHEDULES, f'{key}.schedule', cfg.schedule,
           f'is not a schedule; choose one of {list(training.SCHEDULES)}')
  if cfg.schedule == 'step':
    _require(all(_is_number(f) and 0 < f < 1 for f in cfg.step_fractions), f'{key}.step_fractions',
             cfg.step_fractions, 'must be fractions in (0, 1) of all steps, e.g. (0.3, 0.6, 0.8)')
    finite_positive(cfg.step_factor, f'{key}.step_factor', 'the learning rate\'s factor at each step, e.g. 0.2')
  positive_int(cfg.epochs, f'{key}.epochs', 'the epochs to train (zero trains nothing)')
  positive_int(cfg.batch_size, f'{key}.batch_size', 'images per training step, e.g. 128')
  if sharded:
    training.check_batch_size(cfg.batch_size, f'{key}.batch_size')
  positive_int(cfg.eval_batch_size, f'{key}.eval_batch_size', 'images per evaluation step, e.g. 500')
  nonnegative_int(cfg.precise_bn_batches, f'{key}.precise_bn_batches',
                  'training batches that recompute the BatchNorm statistics (0 keeps the running ones)')
  _require(_is_number(cfg.distill_weight) and 0 <= cfg.distill_weight <= 1, f'{key}.distill_weight',
           cfg.distill_weight, 'must lie in [0, 1] (0 turns distillation off)')
  finite_positive(cfg.distill_temperature, f'{key}.distill_temperature', '4 is usual')
  for name, group in cfg.groups.items():
    finite_positive(group.learning_rate, f'{key}.groups.{name}.learning_rate', 'e.g. 1e-3')
    finite_nonnegative(group.weight_decay, f'{key}.groups.{name}.weight_decay', 'e.g. 5e-4 (0: none)')


def method_training_section(config: ml_collections.ConfigDict) -> Optional[str]:
  """The chosen method's section when it is a training section (codeq, the search's fine-tune), else None."""
  from picpq_jax import methods  # pylint: disable=g-import-not-at-top
  section = getattr(methods.get(config.method.name), 'SECTION', None)
  if section and section in config and 'learning_rate' in config[section] and 'optimizer' in config[section]:
    return section
  return None


def check_config(config: ml_collections.ConfigDict) -> None:
  """The general settings (sections, model, data, training, fine-tuning, export, recompute) that cannot work,
  and the chosen method's training section; pipeline.check_config runs this, then check_batch_sizes against
  the dataset's splits, then the method's own checks, before any work."""
  from picpq_jax import data, fingerprints, models  # pylint: disable=g-import-not-at-top
  check_sections(config)
  _require(_is_int(config.seed), 'seed', config.seed, 'must be an integer')
  if config.model.arch not in models.ARCHS:
    raise ValueError(f'model.arch={config.model.arch!r} is not an architecture of the zoo; choose one of '
                     f'{list(models.ARCHS)}.')
  if config.data.name not in data.DATASETS:
    raise ValueError(f'data.name={config.data.name!r} is not a dataset; choose one of {list(data.DATASETS)}.')
  positive_int(config.data.val_size, 'data.val_size', 'the training images held out for validation, e.g. 5000')
  positive_int(config.data.test_size, 'data.test_size', 'the mnist5k images used as the test split, e.g. 500')
  check_training_section(config.train, 'train')
  ft = config.finetune
  check_training_section(ft, 'finetune')
  epochs = {k: ft[k] for k in ('fp_epochs', 'act_epochs', 'weight_act_epochs')}
  for k, v in epochs.items():
    nonnegative_int(v, f'finetune.{k}', 'the epochs of that fine-tuning stage (0 skips it)')
  if ft.enabled and not any(epochs.values()):
    raise ValueError('finetune.fp_epochs, act_epochs and weight_act_epochs are all 0, so fine-tuning would train '
                     'nothing; give one of them epochs, or set finetune.enabled=False to skip fine-tuning.')
  _require(_is_number(ft.calibration_percentile) and 0 < ft.calibration_percentile <= 100,
           'finetune.calibration_percentile', ft.calibration_percentile, 'must lie in (0, 100], e.g. 99.9')
  nonnegative_int(config.export.check_images, 'export.check_images',
                  'test images the export is checked on (0 skips the check)')
  section = method_training_section(config)
  if section:
    check_training_section(config[section], section, sharded=section not in UNSHARDED_SECTIONS)
  for key, value, _ in batch_sizes(config):
    positive_int(value, key, 'images per batch')
  fingerprints.recompute_stage(config)


def batch_sizes(config: ml_collections.ConfigDict) -> list[tuple[str, int, str]]:
  """(key, value, split) of every batch size this run uses: BATCH_SPLITS' (the search's only for PIC-PQ, the
  fine-tuning's only when it runs), and the batch_size of the method's own training section."""
  from picpq_jax import methods  # pylint: disable=g-import-not-at-top
  own = getattr(methods.get(config.method.name), 'SECTION', None)
  used = {'search': own == 'search', 'finetune': config.finetune.enabled}
  pairs = [(k, split) for k, split in BATCH_SPLITS if used.get(k.split('.')[0], True)]
  section = method_training_section(config)
  if section and section != 'search':
    pairs.append((f'{section}.batch_size', 'train'))
  return [(key, config[key.split('.')[0]][key.split('.')[1]], split) for key, split in pairs]


def check_batch_sizes(config: ml_collections.ConfigDict, info) -> None:
  """Every batch size the run uses is at most the images of its split (`info`: data.dataset_info's)."""
  sizes = {'train': info.num_train, 'validation': info.num_val, 'test': info.num_test}
  for key, value, split in batch_sizes(config):
    if value > sizes[split]:
      raise ValueError(f'{key}={value} is larger than the {sizes[split]} images of the {split} split of '
                       f'{config.data.name} ({SPLIT_SOURCE[split]}); use at most {sizes[split]}.')
