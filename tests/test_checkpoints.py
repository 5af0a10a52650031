"""Damaged files are found and named: checkpoints carry a checksum of their arrays, checked on restore; a damaged
latest step gives way to the newest intact one (or one sentence when none is left); a corrupt JSON or npz
names its file and the way out; a redone epoch's metrics row replaces the old one. (That a fit resumed from
the intact step ends equal to an uninterrupted one: tests/test_training.py, test_fit_resumes_...)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from picpq_jax import checkpoints, training
from picpq_jax.metrics import MetricWriter


def state(scale):
  params = {'conv': {'kernel': jnp.arange(6000, dtype=jnp.float32).reshape(30, 200) * scale}}
  tx = optax.sgd(0.1, momentum=0.9)
  return training.TrainState(step=jnp.int32(scale), params=params, batch_stats={'bn': {'mean': jnp.ones(4)}},
                             opt_state=tx.init(params))


def data_file(directory):
  """The largest file of a saved step: its array data."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def flip_byte(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes([b[0] ^ 0x01]))


def truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def test_the_checksum_ignores_containers_and_sees_every_bit():
  s = state(1)
  as_dicts = {'step': s.step, 'params': s.params, 'batch_stats': s.batch_stats, 'opt_state': list(s.opt_state)}
  assert checkpoints.array_checksum(s) == checkpoints.array_checksum(as_dicts)
  kernel = np.asarray(s.params['conv']['kernel']).copy()
  kernel.view(np.uint32)[7, 11] ^= 1  # one bit of one weight
  assert checkpoints.array_checksum(s.replace(params={'conv': {'kernel': kernel}})) != checkpoints.array_checksum(s)


@pytest.mark.parametrize('damage', [flip_byte, truncate])
def test_a_damaged_latest_step_gives_way_to_the_intact_one(tmp_path, capsys, damage):
  mngr = checkpoints.manager(str(tmp_path / 'stage'))
  checkpoints.save(mngr, 1, state(1), {'epoch': 0})
  checkpoints.save(mngr, 2, state(2), {'epoch': 1})
  damage(data_file(tmp_path / 'stage' / '2'))
  # The latest step asked for by number (a finished stage's result) is one sentence naming it.
  with pytest.raises(checkpoints.CheckpointDamagedError, match=rf'^the checkpoint {tmp_path}/stage/2 is damaged '
                                                               r'\(.+\); recompute the stage'):
    checkpoints.restore(mngr, None, step=2)
  # Resuming: the intact step before it, reported in one line; the damaged step goes, so it can be saved again.
  restored, meta = checkpoints.restore(mngr, state(0))
  assert meta['epoch'] == 0
  np.testing.assert_array_equal(restored.params['conv']['kernel'], state(1).params['conv']['kernel'])
  reason = {flip_byte: 'its arrays do not match the checksum saved with them',
            truncate: 'its array files cannot be read: truncated or garbled'}[damage]
  assert capsys.readouterr().err.strip().splitlines() == [
      f'warning: {tmp_path}/stage/2 is damaged ({reason}); it is removed and the stage resumes from step 1.']
  assert mngr.all_steps() == [1]
  checkpoints.save(mngr, 2, state(2), {'epoch': 1})
  assert checkpoints.restore(mngr, state(0))[1]['epoch'] == 1


def test_no_intact_step_left_is_one_sentence(tmp_path):
  mngr = checkpoints.manager(str(tmp_path / 'stage'))
  checkpoints.save(mngr, 1, state(1), {'epoch': 0})
  flip_byte(data_file(tmp_path / 'stage' / '1'))
  with pytest.raises(checkpoints.CheckpointDamagedError) as e:
    checkpoints.restore(mngr, state(0))
  assert str(e.value) == (f'every checkpoint in {tmp_path}/stage is damaged (step 1: its arrays do not match the '
                          'checksum saved with them); recompute the stage that wrote it or use a fresh --workdir.')


def test_a_mismatched_manifest_is_not_mistaken_for_damage(tmp_path):
  mngr = checkpoints.manager(str(tmp_path / 'stage'))
  checkpoints.save(mngr, 1, state(1), {'arch': 'resnet20'})
  with pytest.raises(checkpoints.CheckpointMismatchError, match="arch='resnet20' but this run has arch='vgg16'"):
    checkpoints.restore(mngr, state(0), expect={'arch': 'vgg16'})
  assert mngr.all_steps() == [1]


def test_corrupt_json_and_npz_name_their_file_and_the_way_out(tmp_path):
  path = tmp_path / 'search.json'
  path.write_bytes(b'{"best_loss": 1.0,\x00\xff')
  with pytest.raises(ValueError, match=rf'^{path} is not valid JSON \(.+\); delete it to recompute that stage, or '
                                       r'use a fresh --workdir\.$'):
    checkpoints.read_json(str(path))
  npz = tmp_path / 'filter_properties.npz'
  checkpoints.write_npz(str(npz), {'stem': np.ones(4)})
  truncate(npz)
  with pytest.raises(ValueError, match=rf'^{npz} is not a readable .npz \(.+\); delete it to recompute'):
    checkpoints.read_npz(str(npz))


def test_a_redone_epoch_replaces_its_metrics_row(tmp_path):
  writer = MetricWriter(str(tmp_path), name='baseline', tensorboard=False)
  for epoch in (1, 2):
    writer.write(epoch * 3, 'epoch', {'epoch': epoch, 'val_accuracy': 0.5})
  with open(writer.path, 'a') as f:
    f.write('{"step": 9, "kind": "ep')  # killed in the middle of epoch 3's row
  writer.keep_rows(lambda row: row.get('epoch', 0) <= 1)  # resumed from epoch 1's checkpoint
  writer.write(6, 'epoch', {'epoch': 2, 'val_accuracy': 0.75})
  rows = [json.loads(line) for line in open(writer.path)]
  assert [(r['epoch'], r['val_accuracy']) for r in rows] == [(1, 0.5), (2, 0.75)]
  mtime = os.path.getmtime(writer.path)
  writer.keep_rows(lambda row: True)
  assert os.path.getmtime(writer.path) == mtime  # nothing to drop: not rewritten
