"""Many processes: what the environment asks for, each process's share of a batch, and two local processes
(two fake CPU devices each, gloo collectives) against one process with four devices."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from picpq_jax import data, hosts, xla_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_requested_settings():
  assert hosts.requested({}) is None
  assert hosts.requested({'PICPQ_DISTRIBUTED': 'auto'}) == {'initialization_timeout': 120}
  env = {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1',
         'PICPQ_INIT_TIMEOUT': '7'}
  assert hosts.requested(env) == {'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 1,
                                  'initialization_timeout': 7}
  bad = [({'JAX_NUM_PROCESSES': '2'}, 'JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID'),
         ({**env, 'JAX_PROCESS_ID': '2'}, 'JAX_PROCESS_ID=2 is not one of the JAX_NUM_PROCESSES=2'),
         ({**env, 'JAX_NUM_PROCESSES': 'two'}, 'whole numbers'),
         ({**env, 'JAX_COORDINATOR_ADDRESS': 'localhost'}, 'has no port'),
         ({**env, 'PICPQ_INIT_TIMEOUT': '-1'}, 'PICPQ_INIT_TIMEOUT'),
         ({'PICPQ_DISTRIBUTED': 'yes'}, 'PICPQ_DISTRIBUTED=auto')]
  for environ, needle in bad:
    with pytest.raises(ValueError, match=needle):
      hosts.requested(environ)


@pytest.mark.parametrize('split,batch_size,train', [('train', 128, True), ('validation', 64, False)])
def test_process_parts_make_the_global_batch(split, batch_size, train):
  """Each of 3 processes reads only its rows (augmented as in one process); together they are the batch,
  also the short last one of an evaluation."""
  cfg = data.default_data_config('mnist5k')
  cfg.augment = 'crop_flip'
  whole = list(data.epoch_batches(cfg, split, batch_size, train=train, epoch=1, seed=3))
  parts = [list(data.epoch_batches(cfg, split, batch_size, train=train, epoch=1, seed=3, part=(i, 3)))
           for i in range(3)]
  assert all(len(p) == len(whole) for p in parts)
  if not train:
    assert len(whole[-1]['label']) < batch_size  # the short last batch is split too
  for k, batch in enumerate(whole):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), batch[key])
  assert [len(p[0]['label']) for p in parts] == [batch_size * (i + 1) // 3 - batch_size * i // 3 for i in range(3)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


TINY = ['--config', 'configs/demo_mnist5k.py', '--config.model.arch=resnet8', '--config.train.epochs=1',
        '--config.data.test_size=500', '--config.data.train_size=500', '--config.data.val_size=200',
        '--config.train.eval_batch_size=100', '--config.search.val_batch_size=100',
        '--config.search.population=4', '--config.search.tournament=2', '--config.search.total_evaluations=10',
        '--config.search.tau=2', '--config.search.calibration_batches=1', '--config.search.calibration_batch_size=32',
        '--config.finetune.fp_epochs=1', '--config.finetune.act_epochs=0', '--config.finetune.weight_act_epochs=0',
        '--config.finetune.precise_bn_batches=1', '--config.export.check_images=10']


def _meet(counts: dict, timeout_s: float = 3.0, port=None) -> dict:
  """hosts.rendezvous of each process id -> its count, in threads (process 0 first); id -> None or the error."""
  port = port or _free_port()
  out = {}

  def one(i, n):
    try:
      hosts.rendezvous(f'127.0.0.1:{port}', n, i, timeout_s)
      out[i] = None
    except ValueError as e:
      out[i] = str(e)

  threads = [threading.Thread(target=one, args=item) for item in sorted(counts.items())]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout_s + 60)
  return out


def test_rendezvous_all_meet_then_the_port_is_free():
  port = _free_port()
  assert _meet({0: 3, 1: 3, 2: 3}, port=port) == {0: None, 1: None, 2: None}
  with socket.create_server(('', port)):  # free again at once, for jax.distributed's coordinator service
    pass


def test_rendezvous_failures_are_the_same_sentence_on_every_process():
  missing = _meet({0: 3, 2: 3}, timeout_s=1.0)
  assert missing[0] == missing[2] and 'only 2 of JAX_NUM_PROCESSES=3 processes (ids [0, 2])' in missing[0]
  counts = _meet({0: 2, 1: 3})
  assert counts[0] == counts[1] == ('process 1 has JAX_NUM_PROCESSES=3 but process 0 has 2; give every process '
                                    'the same JAX_NUM_PROCESSES.')
  alone = _meet({1: 2}, timeout_s=1.0)
  assert 'did not answer within 1.0 s' in alone[1]


def test_rendezvous_port_taken():
  with socket.create_server(('', 0)) as taken:
    port = taken.getsockname()[1]
    with pytest.raises(ValueError, match=f'process 0 cannot listen on port {port}'):
      hosts.rendezvous(f'127.0.0.1:{port}', 2, 0, 1.0)


def _run(script, workdir, processes: int, devices: int, timeout: int = 600, kill_at_step=None):
  """Run `script` with TINY in `processes` local processes of `devices` fake CPU devices each; returns
  their (returncode, stderr). kill_at_step: instead, kill them all (SIGKILL) once the search has saved that
  step (evaluations) or a later one, and return None."""
  base = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'{xla_setup.FAST_CPU_FLAGS} --xla_force_host_platform_device_count={devices}')
  for key in hosts.ENV_KEYS:
    base.pop(key, None)
  port = _free_port()
  procs = []
  try:
    for i in range(processes):
      env = dict(base) if processes == 1 else dict(
          base, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
          JAX_PROCESS_ID=str(i), PICPQ_INIT_TIMEOUT='60')
      procs.append(subprocess.Popen([sys.executable, script, *TINY, '--workdir', str(workdir)], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if kill_at_step else
                                    subprocess.PIPE, text=True))
    if kill_at_step:
      deadline, search = time.time() + timeout, os.path.join(workdir, 'search')
      while time.time() < deadline and all(p.poll() is None for p in procs):
        if max([int(d) for d in os.listdir(search) if d.isdigit()] if os.path.isdir(search) else [], default=0) >= \
            kill_at_step:
          break
        time.sleep(0.05)
      assert all(p.poll() is None for p in procs), 'a process ended before the search saved step %d' % kill_at_step
      return None  # `finally` kills them
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]
  finally:
    for p in procs:  # a failed or hung process takes no other with it, and none outlives the test
      if p.poll() is None:
        p.kill()
        p.wait()


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_two_processes_train_and_search_as_one(tmp_path):
  """One process with 4 devices runs the tiny demo (baseline, search, a fine-tuning epoch, export); two processes
  with 2 devices each then search and fine-tune from the same baseline, killed in the middle of the search and
  started again: the plan is the same exactly, the search's and the fine-tuning's losses to float32 rounding."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  (code, err), = _run('search.py', one, processes=1, devices=4)
  assert code == 0, err[-3000:]
  two.mkdir()
  for name in ('baseline', 'baseline.json'):  # the same baseline, as compare.py links it
    os.symlink(one / name, two / name)
  _run('search.py', two, processes=2, devices=2, kill_at_step=4)  # the initial population saved, 6 to go
  assert not (two / 'search.json').exists()
  outs = _run('search.py', two, processes=2, devices=2)
  assert [c for c, _ in outs] == [0, 0], '\n'.join(e[-3000:] for _, e in outs)
  assert 'process 1 of 2: 2 local of 4 cpu devices' in outs[1][1]
  assert 'search: resumed after' in outs[0][1]  # from the checkpoint, not started again
  with open(one / 'policy.json') as f1, open(two / 'policy.json') as f2:
    assert json.load(f1) == json.load(f2)
  a, b = _rows(one / 'finetune_fp.jsonl'), _rows(two / 'finetune_fp.jsonl')
  assert len(a) == len(b) == 1
  for key in ('train_loss', 'val_loss'):  # the gradients' all-reduce sums in another order: last bits only
    np.testing.assert_allclose(b[0][key], a[0][key], rtol=2e-4, err_msg=key)
  # A one-epoch network near chance has near-equal logits, so those last bits may flip a prediction or two.
  assert abs(b[0]['val_accuracy'] - a[0]['val_accuracy']) <= 2 / 200
  search_a = np.load(one / 'search_history.npz')
  search_b = np.load(two / 'search_history.npz')
  # Each candidate runs on one device in both, but the programs are compiled for 4 and for 2 devices: last bits.
  np.testing.assert_allclose(search_b['loss'], search_a['loss'], rtol=1e-5)


@pytest.mark.slow
def test_a_coordinator_that_never_answers_is_one_sentence(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}',
             JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1', PICPQ_INIT_TIMEOUT='5')
  out = subprocess.run([sys.executable, 'train.py', *TINY, '--workdir', str(tmp_path / 'w')], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'JAX_COORDINATOR_ADDRESS' in lines[0] and 'Traceback' not in out.stderr
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_a_missing_process_is_one_sentence_on_every_process(tmp_path):
  """JAX_NUM_PROCESSES=3 but only processes 0 and 1 start: both end with the same sentence and exit 2, before
  any work (XLA's runtime would otherwise end them with a fatal error)."""
  port = _free_port()
  procs = []
  try:
    for i in range(2):
      env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                 JAX_NUM_PROCESSES='3', JAX_PROCESS_ID=str(i), PICPQ_INIT_TIMEOUT='5')
      procs.append(subprocess.Popen([sys.executable, 'train.py', *TINY, '--workdir', str(tmp_path / 'w')], cwd=ROOT,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert [p.returncode for p in procs] == [2, 2], errs
  lines = [[l for l in e.splitlines() if l.startswith('error:')] for e in errs]
  assert lines[0] == lines[1] and len(lines[0]) == 1 and 'only 2 of JAX_NUM_PROCESSES=3' in lines[0][0]
  assert not any('Traceback' in e for e in errs) and not (tmp_path / 'w').exists()
