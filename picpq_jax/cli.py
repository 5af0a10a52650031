"""What the entry points share: config checks, and turning a user's mistake into one sentence and exit 2."""
from __future__ import annotations

import functools
import re
import os
import sys

import ml_collections

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
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad `--config.x=y` override is one sentence and exit 2, not a traceback; so is
  an override of another method's settings (`--config.codeq.epochs=3` with method.name='picpq')."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = ' '.join(re.sub(r'\\n|[\\\'"]', ' ', str(e)).split())
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    print(f'error: could not apply the command-line settings {bad or argv[1:]}: {message} '
          f'(every key must exist in the config file; see configs/common.py).', file=sys.stderr)
    sys.exit(2)
  config = getattr(flags.FLAGS, 'config', None)
  if config is not None and 'method' in config:
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


def check_config(config: ml_collections.ConfigDict) -> None:
  """The general settings (model, data, training, fine-tuning, export) that cannot work; pipeline.check_config
  runs this and then the chosen method's checks, before any work."""
  from picpq_jax import data, models, training  # pylint: disable=g-import-not-at-top
  if config.model.arch not in models.ARCHS:
    raise ValueError(f'model.arch={config.model.arch!r} is not an architecture of the zoo; choose one of '
                     f'{list(models.ARCHS)}.')
  if config.data.name not in data.DATASETS:
    raise ValueError(f'data.name={config.data.name!r} is not a dataset; choose one of {list(data.DATASETS)}.')
  training.check_batch_size(config.train.batch_size)
  if 'finetune' in config:
    ft = config.finetune
    training.check_batch_size(ft.batch_size, 'finetune.batch_size')
    if not 0.0 <= ft.distill_weight <= 1.0:
      raise ValueError(f'finetune.distill_weight={ft.distill_weight} must lie in [0, 1] (0 turns distillation '
                       'off).')
    if ft.distill_temperature <= 0:
      raise ValueError(f'finetune.distill_temperature={ft.distill_temperature} must be > 0 (4 is usual).')
    if config.export.check_images < 0:
      raise ValueError(f'export.check_images={config.export.check_images} must be >= 0 (0 skips the check).')
    if ft.precise_bn_batches < 0:
      raise ValueError(f'finetune.precise_bn_batches={ft.precise_bn_batches} must be >= 0 (0 keeps the running '
                       'BatchNorm statistics).')
  if config.train.epochs < 0:
    raise ValueError(f'train.epochs={config.train.epochs} must be >= 0.')
