"""What each stage of a run was computed from, so that a run directory is reused only for the settings that
made it (DESIGN.md, "Errors").

A run's stages, in order: baseline -> method -> finetune (or the evaluation of the method's own model) ->
export -> report. Each has a record in <workdir>/fingerprints.json:

  inputs       the config values the stage's result depends on (`stage_inputs`), as JSON
  previous     the fingerprint of the stage before it ('' for the baseline)
  fingerprint  a hash of both: a change anywhere upstream changes every later fingerprint
  entries      the workdir's entries when the stage started: what a recompute of the stage keeps

A stage writes its record when it starts (`enter`), before any file of its own, and only if it has none, so
that a finished run directory run again writes nothing. Before any work, `prepare` compares every record with
what the config asks: a mismatch stops the run with one sentence naming the key, the saved and the asked
value and the two ways out, a fresh --workdir or `--config.recompute=<stage>`, which deletes the files of the
first stage that does not match and of every later one, so that they are computed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Mapping, Optional

import ml_collections

from picpq_jax import checkpoints, hosts

FILE = 'fingerprints.json'
STAGES = ('baseline', 'method', 'finetune', 'export', 'report')
METHOD_SECTION = '<method>'  # in STAGE_INPUTS: the chosen method's own config section

# The config keys (a section stands for all of its keys) each stage's result depends on. The fine-tuning
# stage depends on its section only when it runs (finetune.enabled); otherwise it is the evaluation of the
# method's own model. search.b_max is every method's: it sets the layers' B_max.
STAGE_INPUTS = {
    'baseline': ('seed', 'data', 'model', 'train'),
    'method': ('method.name', 'search.b_max', METHOD_SECTION),
    'finetune': ('finetune.enabled', 'finetune'),
    'export': ('finetune.enabled', 'export'),
    'report': (),
}
# Keys that change how a result is computed, not what it is: a resumed run may change them.
HOW_NOT_WHAT = ('data.data_dir', 'data.download', 'search.eval_mode', 'search.chunk_size', 'search.cache_plans')
HOW_NOT_WHAT_LEAVES = ('eval_batch_size',)

# The file that marks each stage finished, as every version of the pipeline wrote it: a directory holding one
# but no record was made before records existed (or by hand), and is not reused.
MARKERS = {
    'baseline': ('baseline.json',),
    'method': ('policy.json',),
    'finetune': ('finetune.json', 'evaluation.json'),
    'export': ('export.json',),
    'report': ('summary.json',),
}
TENSORBOARD = 'tb'  # the one directory stages share: its entries count one level down


# ----------------------------------------------------------------------------------------------------------
# What a config asks (pure)
# ----------------------------------------------------------------------------------------------------------


def method_label(config: ml_collections.ConfigDict) -> str:
  """The method stage's name in messages and for --config.recompute: the method's config section (picpq:
  'search'), or 'method'."""
  from picpq_jax import methods  # pylint: disable=g-import-not-at-top
  return getattr(methods.get(config.method.name), 'SECTION', None) or 'method'


def label(config: ml_collections.ConfigDict, stage: str) -> str:
  return method_label(config) if stage == 'method' else stage


def recompute_choices(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The values --config.recompute takes: a stage name (the method's section stands for 'method')."""
  return tuple(dict.fromkeys((*STAGES, method_label(config))))


def recompute_stage(config: ml_collections.ConfigDict) -> Optional[str]:
  """The stage config.recompute names (None when empty); ValueError naming the key for another value."""
  value = config.get('recompute', '') or ''
  if not value:
    return None
  choices = recompute_choices(config)
  if value not in choices:
    raise ValueError(f'recompute={value!r} is not a stage; choose one of {list(choices)} (it recomputes that '
                     'stage and every later one where their saved results do not match this config).')
  return 'method' if value == method_label(config) else value


def _json(value: Any) -> Any:
  """`value` as JSON gives it back (tuples as lists), so that a saved and an asked value compare equal."""
  return json.loads(json.dumps(value, default=checkpoints.json_value))


def _leaves(prefix: str, value: Any) -> dict[str, Any]:
  if isinstance(value, Mapping) and value:
    out = {}
    for k in sorted(value):
      out.update(_leaves(f'{prefix}.{k}', value[k]))
    return out
  return {prefix: _json(dict(value) if isinstance(value, Mapping) else value)}


def _counts(key: str) -> bool:
  return key not in HOW_NOT_WHAT and key.rsplit('.', 1)[-1] not in HOW_NOT_WHAT_LEAVES


def stage_inputs(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
  """dotted key -> JSON value of every config value `stage`'s result depends on."""
  resolved = config.to_dict()
  keys = list(STAGE_INPUTS[stage])
  if stage == 'finetune' and not config.finetune.enabled:
    keys = ['finetune.enabled']
  if METHOD_SECTION in keys:
    keys.remove(METHOD_SECTION)
    section = method_label(config)
    if section != 'method' and section in resolved:
      keys.append(section)
  out = {}
  for key in keys:
    value = resolved
    for part in key.split('.'):
      value = value.get(part) if isinstance(value, Mapping) else None
    out.update(_leaves(key, value))
  out = {k: v for k, v in out.items() if _counts(k) and not (k in ADDED_LATER and v == ADDED_LATER[k])}
  for key, file in BY_CONTENT.items():
    if out.get(key):
      out[key] = _content(str(out[key]), file)
  return out


# Settings added after runs were recorded, left out of the record while at these defaults (which change
# nothing), so that run directories made before them still resume.
ADDED_LATER = {'data.train_size': None}

# Settings that name another run directory whose result this stage reads: what counts is that result, not
# where it lives (a comparison directory moved or copied elsewhere still resumes).
BY_CONTENT = {'search.ranking_workdir': 'search.json'}


def _content(directory: str, file: str) -> str:
  """'<file> sha256:<first 16 hex digits>' of directory/file, or the directory itself while it has none."""
  path = os.path.join(directory, file)
  if not os.path.isfile(path):
    return directory
  with open(path, 'rb') as f:
    return f'{file} sha256:{hashlib.sha256(f.read()).hexdigest()[:16]}'


def fingerprint(inputs: Mapping[str, Any], previous: str) -> str:
  text = json.dumps({'inputs': inputs, 'previous': previous}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """stage -> {'inputs', 'previous', 'fingerprint'} as this config asks, in stage order."""
  out, previous = {}, ''
  for stage in STAGES:
    inputs = stage_inputs(config, stage)
    out[stage] = {'inputs': inputs, 'previous': previous, 'fingerprint': fingerprint(inputs, previous)}
    previous = out[stage]['fingerprint']
  return out


def difference(saved: Mapping[str, Any], asked: Mapping[str, Any]) -> tuple[str, Any, Any]:
  """(key, saved value, asked value) of the first input that differs; ('', ...) when only the stage before
  differs."""
  missing = object()
  for key in sorted(set(saved['inputs']) | set(asked['inputs'])):
    a, b = saved['inputs'].get(key, missing), asked['inputs'].get(key, missing)
    if a != b:
      return key, (None if a is missing else a), (None if b is missing else b)
  return '', saved.get('previous'), asked.get('previous')


def mismatch_message(workdir: str, config: ml_collections.ConfigDict, stage: str, saved: Mapping[str, Any],
                     asked: Mapping[str, Any], linked_from: Optional[str] = None) -> str:
  name = label(config, stage)
  key, old, new = difference(saved, asked)
  if key:
    what = f'was computed with {key}={old!r}, but this run asks for {key}={new!r}'
  else:
    what = 'was computed from another result of the stage before it'
  if linked_from:
    return (f'the {name} stage in {workdir} (linked from {linked_from}) {what}; use a fresh --workdir or the '
            'config that made it.')
  return (f'the {name} stage in {workdir} {what}; use a fresh --workdir, or add --config.recompute={name} to '
          f'compute {name} and every later stage again there.')


# ----------------------------------------------------------------------------------------------------------
# The records in a run directory
# ----------------------------------------------------------------------------------------------------------


def load(workdir: str) -> dict:
  path = os.path.join(workdir, FILE)
  return checkpoints.read_json(path) if os.path.exists(path) else {}


def entries(workdir: str) -> list[str]:
  """The workdir's top-level entries (and TensorBoard's per-stage directories), without the records."""
  if not os.path.isdir(workdir):
    return []
  out = [n for n in os.listdir(workdir) if n != FILE]
  tb = os.path.join(workdir, TENSORBOARD)
  if os.path.isdir(tb) and not os.path.islink(tb):
    out += [f'{TENSORBOARD}/{n}' for n in os.listdir(tb)]
  return sorted(out)


def _marker(workdir: str, stage: str) -> Optional[str]:
  for name in MARKERS[stage]:
    path = os.path.join(workdir, name)
    if os.path.lexists(path):
      return path
  return None


def saved_record(workdir: str, records: Mapping[str, Any], stage: str) -> tuple[Optional[dict], Optional[str]]:
  """(the stage's record, the directory it comes from when the stage's result is linked from another run
  directory, else None). A linked result (compare.py links every run's baseline) carries the record of the
  directory it is linked from."""
  if stage in records:
    return records[stage], None
  marker = _marker(workdir, stage)
  if marker is not None and os.path.islink(marker):
    source = os.path.dirname(os.path.realpath(marker))
    return load(source).get(stage), source
  return None, None


def _unrecorded_message(workdir: str, config, stage: str, marker: str) -> str:
  return (f'{workdir} holds a {label(config, stage)} result ({os.path.basename(marker)}) without a record of the '
          f'settings it was computed with ({FILE}: made by an older version, or by hand); use a fresh --workdir.')


def check_workdir(workdir: str) -> None:
  """The run directory exists (created if missing) and is a directory; one sentence otherwise."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir} is a file, not a directory; choose a directory (it is created if '
                     'missing).')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(f'--workdir {workdir} cannot be created ({e.strerror or e}); choose a directory you can write '
                  'to.') from None


def prepare(workdir: str, config: ml_collections.ConfigDict, last: str = STAGES[-1]) -> None:
  """Before any work: every saved stage up to `last` matches the config, or config.recompute allows
  computing the first that does not (and every later one) again, whose files are then deleted.

  Raises ValueError (one sentence) for a mismatch, a result without a record, a workdir that is a file, or a
  read-only workdir with something left to compute.
  """
  recompute = recompute_stage(config)
  check_workdir(workdir)
  asked, records = plan(config), load(workdir)
  stages = STAGES[:STAGES.index(last) + 1]
  for stage in stages:
    saved, source = saved_record(workdir, records, stage)
    if saved is None:
      marker = _marker(workdir, stage)
      if marker is not None:
        raise ValueError(_unrecorded_message(workdir, config, stage, marker))
      continue
    if saved.get('fingerprint') == asked[stage]['fingerprint']:
      continue
    allowed = recompute is not None and STAGES.index(stage) >= STAGES.index(recompute) and source is None
    if not allowed:
      raise ValueError(mismatch_message(workdir, config, stage, saved, asked[stage], source))
    discard(workdir, records, stage)
    records = load(workdir)
    break
  todo = [s for s in stages if saved_record(workdir, records, s)[0] is None]
  if todo and not os.access(workdir, os.W_OK):
    raise OSError(f'--workdir {workdir} is not writable and the {label(config, todo[0])} stage is still to be '
                  'computed there; choose a --workdir you can write to (a copy of this one).')


def discard(workdir: str, records: Mapping[str, Any], stage: str) -> None:
  """Delete every file `stage` and the stages after it made (what was not there when it started), then
  their records. Files first: a run killed in between finds the old records and discards again."""
  keep = set(records[stage].get('entries', ()))
  gone = [e for e in entries(workdir) if e not in keep] if hosts.is_writer() else []  # process 0 deletes
  for entry in gone:
    parent = entry.split('/', 1)[0]
    if '/' in entry and parent in gone:
      continue  # inside a directory deleted whole
    path = os.path.join(workdir, entry)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
  later = STAGES[STAGES.index(stage):]
  checkpoints.write_json(os.path.join(workdir, FILE), {s: r for s, r in records.items() if s not in later})


def enter(workdir: str, config: ml_collections.ConfigDict, stage: str) -> None:
  """At the start of `stage`: its saved record must match the config (ValueError otherwise); without one,
  the record is written, before any file of the stage. Writes nothing when the record is there."""
  asked = plan(config)[stage]
  records = load(workdir)
  saved, source = saved_record(workdir, records, stage)
  if saved is not None:
    if saved.get('fingerprint') != asked['fingerprint']:
      raise ValueError(mismatch_message(workdir, config, stage, saved, asked, source))
    return
  marker = _marker(workdir, stage)
  if marker is not None:
    raise ValueError(_unrecorded_message(workdir, config, stage, marker))
  os.makedirs(workdir, exist_ok=True)
  records = {**records, stage: {**asked, 'entries': entries(workdir)}}
  checkpoints.write_json(os.path.join(workdir, FILE), records)
