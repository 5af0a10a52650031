"""Bad inputs a demanding new user would try, run through the real entry points, each classified by outcome.

  .venv/bin/python bench/bad_inputs.py [--only SUBSTRING ...] [--keep DIR]     # about 15-25 minutes on 2 cores

Every case runs `train.py` or `search.py` on the demo config made tiny (one epoch on 500 images, a 6-candidate
search, one epoch per fine-tuning stage), in a fresh work directory or in a copy of a finished tiny run `W`
(made once, first). Outcomes, as issue 16 counts them:

  clear      exit code 2, stderr one line `error: ...` naming the setting or file (the case's needle), no
             traceback, and the work directory unchanged (no file added, removed or modified)
  late       clear, but only after work was done (the work directory changed)
  unclear    non-zero exit without a traceback, but the message is not one line or does not name the needle
  traceback  a Python traceback on stderr
  silent     exit code 0: the bad input was accepted

A few cases are runtime failures that cannot be seen before work (NaN in training, a failing search): for
those `clear` means one clear sentence, exit 2, and no stage saved as finished (their `late` is expected and
counted as clear when nothing finished was saved). Cases needing root (a tmpfs for "disk full" and a
read-only mount) are skipped when it is not available. Prints a table and the counts per outcome.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = ['--config.train.epochs=1', '--config.data.test_size=4300', '--config.data.val_size=200',
        '--config.train.eval_batch_size=100', '--config.search.val_batch_size=100',
        '--config.search.population=4', '--config.search.tournament=2', '--config.search.total_evaluations=6',
        '--config.search.tau=1', '--config.search.calibration_batches=1',
        '--config.search.calibration_batch_size=32', '--config.finetune.fp_epochs=1',
        '--config.finetune.act_epochs=0', '--config.finetune.weight_act_epochs=1',
        '--config.finetune.precise_bn_batches=1', '--config.export.check_images=10']
DEMO = 'configs/demo_mnist5k.py'


def env():
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  return dict(os.environ, XLA_FLAGS=xla_setup.FAST_CPU_FLAGS, PYTHONPATH=ROOT)


def run(script, args, timeout=900):
  t0 = time.time()
  out = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=timeout)
  return out, time.time() - t0


def snapshot(path):
  """path -> digest of every file under `path` (and the directories), or None if it does not exist."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      return {'.': hashlib.sha1(f.read()).hexdigest()}
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path) + '/'] = ''
    for name in files:
      p = os.path.join(root, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, path)] = hashlib.sha1(f.read()).hexdigest()
  return out


def error_lines(stderr):
  """The lines of stderr a person reads: progress bars (carriage returns) and blank lines left out."""
  lines = []
  for line in stderr.splitlines():
    line = line.split('\r')[-1].strip()
    if line and not line.startswith(('baseline epoch', 'search:', 'finetune_', 'codeq epoch')):
      lines.append(line)
  return lines


def classify(out, before, after, needle, runtime=False, finished_files=()):
  if out.returncode == 0:
    return 'silent'
  if 'Traceback' in out.stderr:
    return 'traceback'
  lines = error_lines(out.stderr)
  if len(lines) != 1 or not lines[0].startswith('error: ') or (needle and needle not in lines[0]):
    return 'unclear'
  if runtime and any('tmp' in p for p in after or {}):
    return 'late'  # a temporary file left behind
  if before != after:
    if runtime:
      return 'late' if any(f in (after or {}) and f not in (before or {}) for f in finished_files) else 'clear'
    return 'late'
  return 'clear'


# ------------------------------------------------------------------------------------------------------------
# The cases: (name, script, args, needle, prepare) where prepare(workdir) sets the directory up and may return
# extra arguments; '{W}' in a prepare means a copy of the finished tiny run.
# ------------------------------------------------------------------------------------------------------------


def fresh(workdir):
  del workdir


def copy_w(workdir):
  shutil.copytree(FINISHED, workdir, symlinks=True)


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def config_file(text, drop=None):
  """A config file of `text`; drop: a section it lacks, whose tiny overrides are then left out."""
  def prepare(workdir):
    path = os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + '_config.py')
    write(path, text)
    return ['--config', path] + ([f'--drop={drop}'] if drop else [])
  return prepare


def corrupt(relpath, how):
  """Copy W, then damage W/relpath: 'flip' 4 KB of random bytes in its middle, 'truncate' to half,
  'garble' the first bytes. A directory `relpath` means its largest file (an orbax array data file)."""
  def prepare(workdir):
    copy_w(workdir)
    path = os.path.join(workdir, relpath)
    if os.path.isdir(path):
      files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
      path = max(files, key=os.path.getsize)
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      if how == 'flip':
        f.seek(size // 3)
        chunk = bytearray(f.read(min(4096, size // 3)))
        f.seek(size // 3)
        f.write(bytes(b ^ 0x5A for b in chunk))
      elif how == 'truncate':
        f.truncate(size // 2)
      else:
        f.seek(0)
        f.write(b'\x00garbage{' * 4)
  return prepare


def remove(*relpaths, then=copy_w):
  def prepare(workdir):
    then(workdir)
    for r in relpaths:
      p = os.path.join(workdir, r)
      if os.path.exists(p):
        (shutil.rmtree if os.path.isdir(p) else os.remove)(p)
  return prepare


def latest_step(workdir, stage):
  return max(int(d) for d in os.listdir(os.path.join(workdir, stage)) if d.isdigit())


def truncate_latest_search_step(workdir):
  copy_w(workdir)
  os.remove(os.path.join(workdir, 'search.json'))
  for name in ('policy.json', 'search_history.npz', 'search_loss.png'):
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, name))
  step = os.path.join(workdir, 'search', str(latest_step(workdir, 'search')))
  files = [os.path.join(r, f) for r, _, fs in os.walk(step) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def a_file(workdir):
  write(workdir, 'not a directory\n')


def parent_is_file(workdir):
  write(workdir, 'x\n')
  return ['--workdir', os.path.join(workdir, 'sub')]


TMPFS = []


def small_tmpfs(size):
  def prepare(workdir):
    os.makedirs(workdir)
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', workdir],
                      capture_output=True).returncode:
      raise unittest_skip('mount needs root')
    TMPFS.append(workdir)
  return prepare


def read_only_copy(workdir):
  os.makedirs(workdir)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200m', 'tmpfs', workdir], capture_output=True).returncode:
    raise unittest_skip('mount needs root')
  TMPFS.append(workdir)
  for name in os.listdir(FINISHED):
    src = os.path.join(FINISHED, name)
    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(workdir, name))
  subprocess.run(['mount', '-o', 'remount,ro', workdir], check=True)


class unittest_skip(Exception):  # noqa: N801
  pass


OTHER = '--config.method.name=uniform'
CASES = [
    # Config files and flags
    ('config file missing', 'train.py', ['--config', 'configs/does_not_exist.py'], 'does_not_exist.py', fresh),
    ('config syntax error', 'train.py', [], 'syntax', config_file('def get_config(:\n  pass\n')),
    ('config without get_config', 'train.py', [], 'get_config', config_file('X = 1\n')),
    ('config without search section', 'search.py', [], 'search', config_file(
        'from configs import demo_mnist5k\n\ndef get_config():\n  c = demo_mnist5k.get_config()\n'
        '  del c["search"]\n  return c\n', drop='search')),
    ('config without train section', 'train.py', [], 'train', config_file(
        'from configs import demo_mnist5k\n\ndef get_config():\n  c = demo_mnist5k.get_config()\n'
        '  del c["train"]\n  return c\n', drop='train')),
    ('misspelled override', 'train.py', ['--config.train.epoch=3'], 'train.epoch', fresh),
    ('override of wrong type', 'train.py', ['--config.train.epochs=abc'], 'train.epochs', fresh),
    ('other method setting', 'search.py', ['--config.codeq.epochs=3'], 'codeq.epochs', fresh),
    ('recompute of an unknown stage', 'search.py', ['--config.recompute=everything'], 'recompute', fresh),
    # Work directory
    ('workdir is a file', 'train.py', [], 'workdir', a_file),
    ('workdir under a file', 'train.py', [], 'workdir', parent_is_file),
    ('workdir not creatable', 'train.py', ['--workdir', '/proc/picpq_run'], '/proc/picpq_run', fresh),
    ('disk full', 'train.py', [], 'space', small_tmpfs('300k')),
    # Batch sizes
    ('train.batch_size=0', 'train.py', ['--config.train.batch_size=0'], 'train.batch_size', fresh),
    ('train.batch_size=-8', 'train.py', ['--config.train.batch_size=-8'], 'train.batch_size', fresh),
    ('train.batch_size=8192', 'train.py', ['--config.train.batch_size=8192'], 'train.batch_size', fresh),
    ('train.eval_batch_size=0', 'train.py', ['--config.train.eval_batch_size=0'], 'train.eval_batch_size', fresh),
    ('train.eval_batch_size=99999', 'train.py', ['--config.train.eval_batch_size=99999'],
     'train.eval_batch_size', fresh),
    ('search.batch_size=0', 'search.py', ['--config.search.batch_size=0'], 'search.batch_size', fresh),
    ('search.batch_size=9999', 'search.py', ['--config.search.batch_size=9999'], 'search.batch_size', fresh),
    ('search.val_batch_size=0', 'search.py', ['--config.search.val_batch_size=0'], 'search.val_batch_size', fresh),
    ('search.val_batch_size=9999', 'search.py', ['--config.search.val_batch_size=9999'],
     'search.val_batch_size', fresh),
    ('search.calibration_batch_size=0', 'search.py', ['--config.search.calibration_batch_size=0'],
     'search.calibration_batch_size', fresh),
    ('finetune.batch_size=0', 'search.py', ['--config.finetune.batch_size=0'], 'finetune.batch_size', fresh),
    ('finetune.batch_size=99999', 'search.py', ['--config.finetune.batch_size=99999'], 'finetune.batch_size',
     fresh),
    ('codeq.batch_size=0', 'search.py', ['--config.method.name=codeq', '--config.codeq.batch_size=0'],
     'codeq.batch_size', fresh),
    # Epochs
    ('train.epochs=0', 'train.py', ['--config.train.epochs=0'], 'train.epochs', fresh),
    ('train.epochs=-1', 'train.py', ['--config.train.epochs=-1'], 'train.epochs', fresh),
    ('finetune.fp_epochs=-1', 'search.py', ['--config.finetune.fp_epochs=-1'], 'finetune.fp_epochs', fresh),
    ('all finetune epochs 0', 'search.py', ['--config.finetune.fp_epochs=0', '--config.finetune.act_epochs=0',
                                            '--config.finetune.weight_act_epochs=0'], 'finetune', fresh),
    ('codeq.epochs=0', 'search.py', ['--config.method.name=codeq', '--config.codeq.epochs=0'], 'codeq.epochs',
     fresh),
    # Optimizer settings
    ('train.learning_rate=0', 'train.py', ['--config.train.learning_rate=0'], 'train.learning_rate', fresh),
    ('train.learning_rate=-0.1', 'train.py', ['--config.train.learning_rate=-0.1'], 'train.learning_rate', fresh),
    ('train.learning_rate=nan', 'train.py', ['--config.train.learning_rate=nan'], 'train.learning_rate', fresh),
    ('finetune.learning_rate=inf', 'search.py', ['--config.finetune.learning_rate=inf'],
     'finetune.learning_rate', fresh),
    ('search.learning_rate=-1', 'search.py', ['--config.search.learning_rate=-1'], 'search.learning_rate', fresh),
    ('train.momentum=1.5', 'train.py', ['--config.train.momentum=1.5'], 'train.momentum', fresh),
    ('train.weight_decay=-1', 'train.py', ['--config.train.weight_decay=-1'], 'train.weight_decay', fresh),
    ('train.optimizer=adam', 'train.py', ['--config.train.optimizer=adam'], 'train.optimizer', fresh),
    ('train.schedule=linear', 'train.py', ['--config.train.schedule=linear'], 'train.schedule', fresh),
    ('finetune.step_factor=0', 'search.py', ['--config.finetune.schedule=step', '--config.finetune.step_factor=0'],
     'finetune.step_factor', fresh),
    ('train.step_fractions=(1.5,)', 'train.py', ['--config.train.schedule=step',
                                                  '--config.train.step_fractions=(1.5,)'],
     'train.step_fractions', fresh),
    # Bits
    ('search.min_bits=0', 'search.py', ['--config.search.min_bits=0'], 'search.min_bits', fresh),
    ('search.min_bits=40', 'search.py', ['--config.search.min_bits=40'], 'search.min_bits', fresh),
    ('search.bit_penalty=-1', 'search.py', ['--config.search.bit_penalty=-1'], 'search.bit_penalty', fresh),
    ('uniform.bits=0', 'search.py', [OTHER, '--config.uniform.bits=0'], 'uniform.bits', fresh),
    ('search.b_max too short', 'search.py', ['--config.search.b_max=(8,8)'], 'search.b_max', fresh),
    ('codeq.max_bits=99', 'search.py', ['--config.method.name=codeq', '--config.codeq.max_bits=99'],
     'codeq.max_bits', fresh),
    ('opq.avg_bits=40', 'search.py', ['--config.method.name=opq', '--config.opq.avg_bits=40'], 'opq.avg_bits',
     fresh),
    # Search settings
    ('search.keep_fraction=0', 'search.py', ['--config.search.keep_fraction=0'], 'search.keep_fraction', fresh),
    ('search.keep_fraction=1.5', 'search.py', ['--config.search.keep_fraction=1.5'], 'search.keep_fraction',
     fresh),
    ('search.keep_fraction=0.01', 'search.py', ['--config.search.keep_fraction=0.01'], 'keep_fraction', fresh),
    ('search.population=1', 'search.py', ['--config.search.population=1'], 'search.population', fresh),
    ('search.tournament=0', 'search.py', ['--config.search.tournament=0'], 'search.tournament', fresh),
    ('search.total_evaluations=0', 'search.py', ['--config.search.total_evaluations=0'],
     'search.total_evaluations', fresh),
    ('search.tau=-1', 'search.py', ['--config.search.tau=-1'], 'search.tau', fresh),
    ('search.safeguard=1.5', 'search.py', ['--config.search.safeguard=1.5'], 'search.safeguard', fresh),
    ('search.check_every=0', 'search.py', ['--config.search.check_every=0'], 'search.check_every', fresh),
    ('search.criterion=foo', 'search.py', ['--config.search.criterion=foo'], 'search.criterion', fresh),
    ('search.calibration_batches=0', 'search.py', ['--config.search.calibration_batches=0'],
     'search.calibration_batches', fresh),
    ('search.num_children=0', 'search.py', ['--config.search.num_children=0'], 'search.num_children', fresh),
    ('search.chunk_size=0', 'search.py', ['--config.search.chunk_size=0'], 'search.chunk_size', fresh),
    ('search.strategy=annealing', 'search.py', ['--config.search.strategy=annealing'], 'search.strategy', fresh),
    ('uniform.keep_fraction=2', 'search.py', [OTHER, '--config.uniform.keep_fraction=2'], 'uniform.keep_fraction',
     fresh),
    # Data, model, method, fine-tuning, export
    ('data.name=svhn', 'train.py', ['--config.data.name=svhn'], 'data.name', fresh),
    ('model.arch=resnet21', 'train.py', ['--config.model.arch=resnet21'], 'model.arch', fresh),
    ('method.name=foo', 'search.py', ['--config.method.name=foo'], 'method.name', fresh),
    ('data.val_size=0', 'train.py', ['--config.data.val_size=0'], 'data.val_size', fresh),
    ('data.val_size=5000', 'train.py', ['--config.data.val_size=5000'], 'data.val_size', fresh),
    ('data.augment=rotate', 'train.py', ['--config.data.augment=rotate'], 'data.augment', fresh),
    ('data.image_size=16', 'train.py', ['--config.data.image_size=16'], 'data.image_size', fresh),
    ('dataset not prepared', 'train.py', ['--config.data.name=cifar10', '--config.data.data_dir=/tmp/no_tfds',
                                          '--config.data.augment=crop_flip'], 'cifar10', fresh),
    ('export.check_images=-1', 'search.py', ['--config.export.check_images=-1'], 'export.check_images', fresh),
    ('finetune.distill_weight=1.5', 'search.py', ['--config.finetune.distill_weight=1.5'],
     'finetune.distill_weight', fresh),
    ('finetune.calibration_percentile=150', 'search.py', ['--config.finetune.calibration_percentile=150'],
     'finetune.calibration_percentile', fresh),
    ('finetune.precise_bn_batches=-1', 'search.py', ['--config.finetune.precise_bn_batches=-1'],
     'finetune.precise_bn_batches', fresh),
    # Stale or damaged run directories (W: a finished tiny run)
    ('W: search.keep_fraction changed', 'search.py', ['--config.search.keep_fraction=0.3'],
     'search.keep_fraction', copy_w),
    ('W: train.learning_rate changed', 'search.py', ['--config.train.learning_rate=0.02'], 'train.learning_rate',
     copy_w),
    ('W: finetune.fp_epochs changed', 'search.py', ['--config.finetune.fp_epochs=2'], 'finetune.fp_epochs',
     copy_w),
    ('W: model.arch changed', 'search.py', ['--config.model.arch=resnet32'], 'model.arch', copy_w),
    ('W: method changed', 'search.py', [OTHER], 'method.name', copy_w),
    ('finetune in an empty dir', 'train.py', ['--finetune'], 'policy.json', fresh),
    ('W: baseline.json garbled', 'search.py', [], 'baseline.json', corrupt('baseline.json', 'garble')),
    ('W: policy.json truncated', 'search.py', [], 'policy.json', corrupt('policy.json', 'truncate')),
    ('W: filter_properties.npz garbled', 'search.py', [], 'filter_properties.npz',
     remove('search.json', 'policy.json', then=corrupt('filter_properties.npz', 'garble'))),
    ('W: baseline checkpoint bytes flipped', 'search.py', [], 'baseline', corrupt('baseline', 'flip')),
    ('W: baseline checkpoint truncated', 'search.py', [], 'baseline', corrupt('baseline', 'truncate')),
    ('W: best fine-tuned checkpoint truncated, export missing', 'search.py', [], 'finetune_weight_act',
     remove('export.json', 'model_export.npz', then=corrupt('finetune_weight_act_best', 'truncate'))),
    # Runtime failures (seen only while running; clear = one sentence, exit 2, nothing saved as finished)
    ('train.learning_rate=1e6 (NaN)', 'train.py', ['--config.train.learning_rate=1e6'], 'train.learning_rate',
     fresh),
    ('finetune.learning_rate=1e6 (NaN)', 'search.py', ['--config.finetune.learning_rate=1e6'],
     'finetune.learning_rate', fresh),
    ('search.learning_rate=1e6 (NaN search)', 'search.py', ['--config.search.learning_rate=1e6'],
     'search.learning_rate', fresh),
]
RUNTIME = {'disk full': ('baseline.json',),
           'train.learning_rate=1e6 (NaN)': ('baseline.json',),
           'finetune.learning_rate=1e6 (NaN)': ('finetune.json',),
           'search.learning_rate=1e6 (NaN search)': ('search.json', 'policy.json')}

# Cases that must succeed: (name, script, args, prepare, check(workdir before, after) -> problem or None)
GOOD = [
    ('W: rerun writes nothing', 'search.py', [], copy_w, lambda b, a: None if a == b else 'the directory changed'),
    ('W: read-only copy', 'search.py', [], read_only_copy, lambda b, a: None),
    ('W: truncated latest search step resumes', 'search.py', [], truncate_latest_search_step,
     lambda b, a: None if 'policy.json' in a else 'no policy'),
    ('W: recompute=search after a keep_fraction change', 'search.py',
     ['--config.search.keep_fraction=0.5', '--config.recompute=search'], copy_w,
     lambda b, a: (None if a['baseline.json'] == b['baseline.json'] and a['policy.json'] != b['policy.json']
                   else 'the baseline changed or the policy did not')),
]

FINISHED = None


def main():
  global FINISHED
  parser = argparse.ArgumentParser()
  parser.add_argument('--only', nargs='*', default=())
  parser.add_argument('--keep', default=None, help='keep the work directories here')
  parser.add_argument('--finished', default=None, help='an existing finished tiny run to use as W')
  args = parser.parse_args()
  base = args.keep or tempfile.mkdtemp(prefix='bad_inputs_')
  os.makedirs(base, exist_ok=True)
  FINISHED = args.finished or os.path.join(base, 'W')
  if not os.path.exists(os.path.join(FINISHED, 'summary.json')):
    out, seconds = run('search.py', ['--config', DEMO, '--workdir', FINISHED, *TINY])
    assert out.returncode == 0, out.stderr[-3000:]
    print(f'W: finished tiny run in {seconds:.0f} s', flush=True)
  counts, rows = collections.Counter(), []
  selected = [c for c in CASES if not args.only or any(o in c[0] for o in args.only)]
  for i, (name, script, extra, needle, prepare) in enumerate(selected):
    workdir = os.path.join(base, f'case{i:02d}')
    try:
      more = prepare(workdir) or []
    except unittest_skip as e:
      rows.append((name, 'skipped', str(e)))
      continue
    drop = [m.split('=', 1)[1] for m in more if m.startswith('--drop=')]
    if any(a.startswith('--config.method.name=') and a != '--config.method.name=picpq' for a in extra):
      drop.append('search')  # another method: the search's tiny settings would be refused as not its own
    more = [m for m in more if not m.startswith('--drop=')]
    tiny = [t for t in TINY if not any(t.startswith(f'--config.{d}.') for d in drop)]
    given = [*extra, *more]
    config = given[given.index('--config'):][:2] if '--config' in given else ['--config', DEMO]
    cmd = [*config, '--workdir', workdir, *tiny, *[a for a in given if a not in config]]
    target = cmd[len(cmd) - 1 - cmd[::-1].index('--workdir') + 1]
    before = snapshot(target)
    try:
      out, seconds = run(script, cmd)
    finally:
      pass
    after = snapshot(target)
    outcome = classify(out, before, after, needle, runtime=name in RUNTIME, finished_files=RUNTIME.get(name, ()))
    counts[outcome] += 1
    lines = error_lines(out.stderr)
    message = lines[-1] if lines else out.stdout.strip().splitlines()[-1:] or ''
    rows.append((name, outcome, f'{seconds:.0f}s rc={out.returncode} {str(message)[:300]}'))
    print(f'{outcome:9s} {name}: {rows[-1][2]}', flush=True)
  for i, (name, script, extra, prepare, check) in enumerate(
      g for g in GOOD if not args.only or any(o in g[0] for o in args.only)):
    workdir = os.path.join(base, f'good{i:02d}')
    try:
      prepare(workdir)
    except unittest_skip as e:
      print(f'skipped   {name}: {e}')
      continue
    before = snapshot(workdir)
    out, seconds = run(script, ['--config', DEMO, '--workdir', workdir, *TINY, *extra])
    after = snapshot(workdir)
    problem = (f'rc={out.returncode} {error_lines(out.stderr)[-1:]}' if out.returncode else check(before, after))
    outcome = 'ok' if problem is None else 'fails'
    counts['good ' + outcome] += 1
    print(f'{outcome:9s} {name}: {seconds:.0f}s {problem or ""}', flush=True)
  for mount in TMPFS:
    subprocess.run(['umount', mount], capture_output=True)
  print()
  print(f'{len(selected)} bad inputs: ' + ', '.join(f'{k} {counts[k]}' for k in
                                                   ('clear', 'late', 'unclear', 'traceback', 'silent')))
  print('must-work cases: ' + ', '.join(f'{k} {v}' for k, v in counts.items() if k.startswith('good')))
  if not args.keep:
    shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
  main()
