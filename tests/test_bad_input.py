"""Bad input stops before any work with one sentence naming the setting (or file) and what would work, exit code
2, and the work directory untouched (issue 16; bench/bad_inputs.py runs the whole list through the entry
points). Most cases call the checks in-process; a few run an entry point to check the exit code and stderr."""
import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import demo_mnist5k
from picpq_jax import checkpoints, cli, fingerprints, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config():
  """The demo on 500 training and 200 validation images (so that 'larger than the split' is cheap to hit)."""
  c = demo_mnist5k.get_config()
  c.data.test_size, c.data.val_size, c.data.train_size = 500, 200, 500
  c.train.eval_batch_size = c.search.val_batch_size = 100
  return c


def one_sentence(message):
  return '\n' not in message and message.endswith('.') and len(message) < 400


# (dotted key -> value, text the sentence must hold: the key and value, or what would work)
BAD = [
    ({'train.batch_size': 0}, 'train.batch_size=0 must be a positive integer'),
    ({'train.batch_size': -8}, 'train.batch_size=-8 must be a positive integer'),
    ({'train.batch_size': 8192}, 'train.batch_size=8192 is larger than the 500 images of the train split'),
    ({'train.eval_batch_size': 0}, 'train.eval_batch_size=0 must be a positive integer'),
    ({'train.eval_batch_size': 300}, 'train.eval_batch_size=300 is larger than the 200 images of the validation'),
    ({'search.batch_size': 0}, 'search.batch_size=0 must be a positive integer'),
    ({'search.batch_size': 600}, 'search.batch_size=600 is larger than the 500 images'),
    ({'search.val_batch_size': 0}, 'search.val_batch_size=0 must be a positive integer'),
    ({'search.val_batch_size': 201}, 'search.val_batch_size=201 is larger than the 200 images'),
    ({'search.calibration_batch_size': 0}, 'search.calibration_batch_size=0 must be a positive integer'),
    ({'finetune.batch_size': 0}, 'finetune.batch_size=0 must be a positive integer'),
    ({'finetune.batch_size': 512}, 'finetune.batch_size=512 is larger than the 500 images'),
    ({'train.epochs': 0}, 'train.epochs=0 must be a positive integer'),
    ({'train.epochs': -1}, 'train.epochs=-1 must be a positive integer'),
    ({'finetune.fp_epochs': -1}, 'finetune.fp_epochs=-1 must be an integer >= 0'),
    ({'finetune.fp_epochs': 0, 'finetune.act_epochs': 0, 'finetune.weight_act_epochs': 0},
     'finetune.enabled=False to skip'),
    ({'train.learning_rate': 0.0}, 'train.learning_rate=0.0 must be a finite number > 0'),
    ({'train.learning_rate': -0.1}, 'train.learning_rate=-0.1 must be a finite number > 0'),
    ({'train.learning_rate': float('nan')}, 'train.learning_rate=nan must be a finite number > 0'),
    ({'finetune.learning_rate': float('inf')}, 'finetune.learning_rate=inf must be a finite number > 0'),
    ({'search.learning_rate': -1.0}, 'search.learning_rate=-1.0 must be a finite number > 0'),
    ({'train.momentum': 1.5}, 'train.momentum=1.5 must lie in [0, 1)'),
    ({'train.weight_decay': -1.0}, 'train.weight_decay=-1.0 must be a finite number >= 0'),
    ({'train.optimizer': 'adam'}, "train.optimizer='adam' is not an optimizer; choose one of ['sgd', 'adamw']"),
    ({'train.schedule': 'linear'}, "train.schedule='linear' is not a schedule"),
    ({'finetune.schedule': 'step', 'finetune.step_factor': 0.0}, 'finetune.step_factor=0.0 must be a finite'),
    ({'train.schedule': 'step', 'train.step_fractions': (1.5,)}, 'train.step_fractions=(1.5,) must be fractions'),
    ({'finetune.calibration_percentile': 150.0}, 'finetune.calibration_percentile=150.0 must lie in (0, 100]'),
    ({'finetune.distill_weight': 1.5}, 'finetune.distill_weight=1.5 must lie in [0, 1]'),
    ({'export.check_images': -1}, 'export.check_images=-1 must be an integer >= 0'),
    ({'data.val_size': 0}, 'data.val_size=0 must be a positive integer'),
    ({'search.min_bits': 0}, 'search.min_bits=0 must be an integer in 1..32'),
    ({'search.min_bits': 40}, 'search.min_bits=40 must be an integer in 1..32'),
    ({'search.bit_penalty': -1.0}, 'search.bit_penalty=-1.0 must be a finite number >= 0'),
    ({'search.keep_fraction': 0.0}, 'search.keep_fraction=0.0 must lie in (0, 1]'),
    ({'search.safeguard': 1.5}, 'search.safeguard=1.5 must lie in [0, 1)'),
    ({'search.check_every': 0}, 'search.check_every=0 must be an integer >= 1'),
    ({'search.population': 1}, 'search.population=1 must be an integer >= 2'),
    ({'search.tournament': 0}, 'search.tournament=0 must be an integer >= 1'),
    ({'search.calibration_batches': 0}, 'search.calibration_batches=0 must be an integer >= 1'),
    ({'search.chunk_size': 0}, 'search.chunk_size=0 must be an integer >= 1'),
    ({'recompute': 'everything'}, "recompute='everything' is not a stage; choose one of ['baseline', 'method'"),
    ({'method.name': 'codeq', 'codeq.batch_size': 1000}, 'codeq.batch_size=1000 is larger than the 500 images'),
    ({'method.name': 'codeq', 'codeq.epochs': 0}, 'codeq.epochs=0 must be'),
]


def apply(config, overrides):
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  return config


@pytest.mark.parametrize('overrides,needle', BAD, ids=[' '.join(f'{k}={v}' for k, v in o.items()) for o, _ in BAD])
def test_bad_setting_is_one_sentence_naming_it(overrides, needle):
  with pytest.raises(ValueError) as e:
    pipeline.check_config(apply(small_config(), overrides))
  assert needle in str(e.value)
  assert one_sentence(str(e.value)), str(e.value)


def test_the_small_config_itself_passes():
  pipeline.check_config(small_config())


def test_a_config_without_a_section_names_it():
  config = small_config()
  del config['search']
  with pytest.raises(ValueError, match='the config has no `search` section; build the config file from '
                                       r'configs/common.base_config\(\)'):
    cli.check_config(config)


@pytest.mark.parametrize('text,needle', [
    (None, 'does not exist'),
    ('def get_config(:\n  pass\n', 'has a syntax error at line 1'),
    ('X = 1\n', 'defines no get_config()'),
    ('def get_config():\n  return {}.missing\n', "fails in get_config() (AttributeError: 'dict' object has no"),
    ('import no_such_module\n', "fails when it is loaded (ModuleNotFoundError: No module named 'no_such_module')"),
])
def test_config_file_problems_name_the_file(tmp_path, text, needle):
  path = tmp_path / 'my_config.py'
  if text is not None:
    path.write_text(text)
  message = cli.config_file_problem(str(path))
  assert message.startswith(f'the config file {path} (--config) ') and needle in message
  assert one_sentence(message)
  assert cli.config_file_problem(os.path.join(ROOT, 'configs', 'demo_mnist5k.py')) is None


def test_a_bad_override_is_named_alone():
  argv = ['train.py', '--config.train.epochs=1', '--config.train.epoch=3', '--config.data.val_size=200']
  assert cli.bad_overrides(argv, "epoch Did you mean epochs instead of epoch ?") == ['--config.train.epoch=3']
  assert cli.config_file_argument(['--config', 'a.py', '--workdir', 'w']) == 'a.py'
  assert cli.config_file_argument(['--config=configs/x.py:arg']) == 'configs/x.py'


def test_workdir_that_is_a_file_or_under_one(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('x')
  with pytest.raises(ValueError, match=f'--workdir {afile} is a file, not a directory'):
    fingerprints.check_workdir(str(afile))
  with pytest.raises(OSError, match=rf'--workdir {afile}/sub cannot be created \(Not a directory\)'):
    fingerprints.check_workdir(str(afile / 'sub'))
  assert afile.read_text() == 'x'


def test_a_result_without_a_record_is_not_reused(tmp_path):
  (tmp_path / 'baseline.json').write_text('{"arch": "resnet20"}')  # a run of a version before fingerprints.json
  with pytest.raises(ValueError, match=f'{tmp_path} holds a baseline result .baseline.json. without a record of '
                                       'the settings it was computed with'):
    fingerprints.prepare(str(tmp_path), small_config())
  assert os.listdir(tmp_path) == ['baseline.json']


def test_disk_full_while_writing_is_one_sentence_and_leaves_no_temporary_file(tmp_path, monkeypatch):
  path = tmp_path / 'result.json'
  checkpoints.write_json(str(path), {'old': 1})

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(OSError) as e:
    checkpoints.write_json(str(path), {'new': 2})
  assert str(e.value) == (f'could not write {path}: No space left on device; free some space there, or choose '
                          'another --workdir, and rerun (the run resumes).')
  assert os.listdir(tmp_path) == ['result.json']  # no .tmp left
  assert checkpoints.read_json(str(path)) == {'old': 1}  # and the old result as it was


def test_disk_full_in_a_checkpoint_is_one_sentence_and_leaves_no_temporary_step(tmp_path, monkeypatch):
  mngr = checkpoints.manager(str(tmp_path / 'stage'))

  def full(step, args=None, force=False):
    del args, force
    os.makedirs(tmp_path / 'stage' / f'{step}.orbax-checkpoint-tmp-123')  # what orbax leaves
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database\n...') from e

  monkeypatch.setattr(mngr, 'save', full)
  with pytest.raises(OSError, match=r'^could not write the checkpoint .*stage/3: No space left on device; free '):
    checkpoints.save(mngr, 3, {'w': np.ones(3)}, {'epoch': 0})
  assert os.listdir(tmp_path / 'stage') == []


def run(script, *args, workdir):
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, script, *args, '--workdir', str(workdir)], cwd=ROOT,
                        env=dict(os.environ, XLA_FLAGS=xla_setup.FAST_CPU_FLAGS), capture_output=True, text=True,
                        timeout=300)


def listing(path):
  return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getmtime(os.path.join(r, f)))
                for r, _, fs in os.walk(path) for f in fs) if os.path.exists(path) else None


@pytest.mark.parametrize('script,args,needle,existing', [
    ('train.py', ['--config', 'configs/does_not_exist.py'], 'the config file configs/does_not_exist.py (--config) '
     'does not exist', False),
    ('search.py', ['--config', 'configs/demo_mnist5k.py', '--config.search.min_bits=0'], 'search.min_bits=0',
     'legacy'),
])
def test_entry_point_stops_with_exit_2_one_line_and_the_workdir_untouched(tmp_path, script, args, needle,
                                                                         existing):
  workdir = tmp_path / 'run'
  if existing == 'legacy':  # a run directory of a version without fingerprints.json
    workdir.mkdir()
    (workdir / 'baseline.json').write_text('{"arch": "resnet20"}')
  before = listing(workdir)
  out = run(script, *args, workdir=workdir)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], out.stderr[-2000:]
  assert listing(workdir) == before


def test_a_search_that_found_nothing_usable_names_the_likely_setting():
  from picpq_jax.methods import picpq  # pylint: disable=g-import-not-at-top
  s = small_config().search
  s.learning_rate = 1e6
  nan = float('nan')
  assert picpq.search_failure(np.array([nan, 1e34, 2.1, 2.3]), 2.1, s, 10) is None  # half failed: still usable
  message = picpq.search_failure(np.array([nan, 1.15e34, nan, 2.3]), 2.3, s, 10)
  assert message == ('the search found no usable candidate (3 of 4 failed with a NaN, infinite or diverged loss, '
                     'the best loss is 2.3); lower search.learning_rate (now 1000000.0), and add '
                     '--config.recompute=search to search again.')
  assert 'best loss is 1.15e+34' in picpq.search_failure(np.array([1.15e34, 2.0, 2.0]), 1.15e34, s, 10)
  s.tau = 0
  assert 'check the baseline' in picpq.search_failure(np.array([nan, nan]), nan, s, 10)


def test_diverged_training_loss():
  from picpq_jax import training  # pylint: disable=g-import-not-at-top
  assert not training.diverged(2.3026, 10) and not training.diverged(40.0, 10)  # untrained; bad but working
  assert training.diverged(float('nan'), 10) and training.diverged(float('inf'), 10)
  assert training.diverged(1.7e18, 10) and training.diverged(2400.0, 10) and not training.diverged(2400.0, 1000)


def test_keep_fraction_1_prunes_nothing():
  from picpq_jax import pruning, topology  # pylint: disable=g-import-not-at-top
  topo = topology.get_topology('resnet20', 10, 32, 1)
  fp = [np.random.default_rng(0).random(l.out_channels) for l in topo.layers]
  ones, zeros = np.ones(topo.num_layers), np.zeros(topo.num_layers)
  masks, info = pruning.global_prune(topo, fp, ones, zeros, 1.0)
  assert all(np.asarray(m).all() for m in masks.values()) and int(info['num_removed']) == 0 and info['reached']
  masks, info = pruning.global_prune(topo, fp, ones, zeros, 0.999)  # just below: something goes
  assert int(info['num_removed']) >= 1 and info['flops'] < 0.999 * pruning.exact_flops(topo, topo.out_channels)
