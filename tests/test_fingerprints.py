"""Stage records (picpq_jax/fingerprints.py): a saved stage is reused only for the settings that made it; a
mismatch stops before any work naming the key, the saved and the asked value and both ways out; a recompute
deletes the first mismatching stage's files and every later one's, and nothing else. No training here: the
stages' files are stand-ins (the whole pipeline's rerun-writes-nothing is checked in test_search.py)."""
import os

import pytest

from configs import demo_mnist5k
from picpq_jax import fingerprints


def config(**overrides):
  c = demo_mnist5k.get_config()
  for key, value in overrides.items():
    section, name = key.split('__')
    c[section][name] = value
  return c


def fake_run(workdir, c, upto='report'):
  """Enter each stage and write a file of it, as the pipeline does."""
  files = {'baseline': 'baseline.json', 'method': 'policy.json', 'finetune': 'finetune.json',
           'export': 'export.json', 'report': 'summary.json'}
  for stage in fingerprints.STAGES[:fingerprints.STAGES.index(upto) + 1]:
    fingerprints.enter(str(workdir), c, stage)
    (workdir / files[stage]).write_text('{}')
    (workdir / f'{stage}_extra').mkdir(exist_ok=True)


def snapshot(path):
  return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getmtime(os.path.join(r, f)))
                for r, ds, fs in os.walk(path) for f in fs + ds)


def test_a_change_changes_its_stage_and_every_later_fingerprint_only():
  base = fingerprints.plan(config())
  changed = fingerprints.plan(config(search__keep_fraction=0.3))
  assert base['baseline'] == changed['baseline']
  for stage in ('method', 'finetune', 'export', 'report'):
    assert base[stage]['fingerprint'] != changed[stage]['fingerprint'], stage
  assert changed['method']['inputs']['search.keep_fraction'] == 0.3
  assert base['method']['inputs']['search.keep_fraction'] == 0.6
  # How, not what: the evaluation mode, chunk size, data location and evaluation batch leave it alone.
  how = fingerprints.plan(config(search__eval_mode='vmap', search__chunk_size=4, data__data_dir='/elsewhere',
                                 train__eval_batch_size=125))
  assert how == base
  # The fine-tuning's settings do not count when it is off (then it is the evaluation of the method's model).
  assert fingerprints.plan(config(finetune__enabled=False))['finetune']['inputs'] == {'finetune.enabled': False}


def test_a_setting_added_later_counts_only_away_from_its_default():
  """data.train_size came after runs were recorded: at None those runs' baseline fingerprint is unchanged."""
  base, smaller = fingerprints.plan(config()), fingerprints.plan(config(data__train_size=300))
  assert 'data.train_size' not in base['baseline']['inputs']
  assert base['baseline']['inputs']['data.test_size'] == 500  # its neighbours are recorded
  assert smaller['baseline']['inputs']['data.train_size'] == 300
  assert smaller['baseline']['fingerprint'] != base['baseline']['fingerprint']


def test_tuples_compare_equal_after_the_json_round_trip(tmp_path):
  c = config(finetune__step_fractions=(0.5, 0.75))
  fake_run(tmp_path, c, upto='finetune')
  fingerprints.prepare(str(tmp_path), config(finetune__step_fractions=(0.5, 0.75)))  # no error


def test_a_finished_run_prepared_and_entered_again_writes_nothing(tmp_path):
  c = config()
  fake_run(tmp_path, c)
  before = snapshot(tmp_path)
  fingerprints.prepare(str(tmp_path), config())
  for stage in fingerprints.STAGES:
    fingerprints.enter(str(tmp_path), config(), stage)
  assert snapshot(tmp_path) == before


def test_a_mismatch_names_key_values_and_both_ways_out_and_changes_nothing(tmp_path):
  fake_run(tmp_path, config())
  before = snapshot(tmp_path)
  with pytest.raises(ValueError) as e:
    fingerprints.prepare(str(tmp_path), config(search__keep_fraction=0.3))
  assert str(e.value) == (f'the search stage in {tmp_path} was computed with search.keep_fraction=0.6, but this '
                          'run asks for search.keep_fraction=0.3; use a fresh --workdir, or add '
                          '--config.recompute=search to compute search and every later stage again there.')
  with pytest.raises(ValueError, match=r'finetune stage in .* was computed with finetune.fp_epochs=3, but this run '
                                       r'asks for finetune.fp_epochs=1; .* --config.recompute=finetune'):
    fingerprints.prepare(str(tmp_path), config(finetune__fp_epochs=1))
  # A recompute of a later stage than the one that differs does not allow it.
  with pytest.raises(ValueError, match='search.keep_fraction'):
    fingerprints.prepare(str(tmp_path), recompute_config('finetune', search__keep_fraction=0.3))
  # The stage functions refuse too (compare.py calls them without prepare).
  with pytest.raises(ValueError, match='search.keep_fraction=0.6'):
    fingerprints.enter(str(tmp_path), config(search__keep_fraction=0.3), 'method')
  assert snapshot(tmp_path) == before


def recompute_config(stage, **overrides):
  c = config(**overrides)
  c.recompute = stage
  return c


def test_recompute_deletes_the_mismatching_stage_and_later_ones_only(tmp_path):
  fake_run(tmp_path, config())
  (tmp_path / 'tb').mkdir()
  c = recompute_config('search', search__keep_fraction=0.3)
  fingerprints.prepare(str(tmp_path), c)
  assert sorted(os.listdir(tmp_path)) == ['baseline.json', 'baseline_extra', fingerprints.FILE]
  assert list(fingerprints.load(str(tmp_path))) == ['baseline']
  fake_run(tmp_path, c)  # computed again, then prepared again with the same config: nothing to do
  before = snapshot(tmp_path)
  fingerprints.prepare(str(tmp_path), c)
  assert snapshot(tmp_path) == before
  # recompute=baseline with only a fine-tuning change discards from the fine-tuning on, not the baseline.
  fingerprints.prepare(str(tmp_path), recompute_config('baseline', search__keep_fraction=0.3,
                                                       finetune__fp_epochs=2))
  assert {'baseline.json', 'policy.json', 'method_extra'} <= set(os.listdir(tmp_path))
  assert 'finetune.json' not in os.listdir(tmp_path) and 'summary.json' not in os.listdir(tmp_path)


def test_a_linked_baseline_carries_the_record_of_its_directory(tmp_path):
  source, run = tmp_path / 'baseline_run', tmp_path / 'run'
  source.mkdir()
  run.mkdir()
  fake_run(source, config(), upto='baseline')
  os.symlink(os.path.relpath(source / 'baseline.json', run), run / 'baseline.json')
  fingerprints.prepare(str(run), config())
  fingerprints.enter(str(run), config(), 'baseline')
  assert not (run / fingerprints.FILE).exists()  # nothing written: the record is the linked directory's
  with pytest.raises(ValueError, match=rf'the baseline stage in {run} \(linked from {source}\) was computed with '
                                       'train.epochs=6, but this run asks for train.epochs=2'):
    fingerprints.prepare(str(run), recompute_config('baseline', train__epochs=2))


def test_a_read_only_workdir_with_work_left_is_refused(tmp_path, monkeypatch):
  fake_run(tmp_path, config(), upto='method')
  monkeypatch.setattr(os, 'access', lambda path, mode: False)
  with pytest.raises(OSError, match=f'--workdir {tmp_path} is not writable and the finetune stage is still to be '
                                    'computed there'):
    fingerprints.prepare(str(tmp_path), config())
  fingerprints.prepare(str(tmp_path), config(), last='method')  # everything up to the method is there
