"""Many processes (hosts, as on a Cloud TPU pod or a multi-GPU cluster): starting them, and the few helpers
with which N processes compute what one process computes and only one of them writes files.

How a run becomes multi-process (the conventions of JAX and big_vision; `initialize`):
  JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i   explicit, e.g. CPU hosts or the
      tests' two local processes; on a CPU the collectives are gloo's.
  PICPQ_DISTRIBUTED=auto   jax.distributed.initialize() finds the cluster itself (Cloud TPU pods, SLURM,
      Open MPI).
  neither                  one process (every helper below is then the identity or a no-op).
PICPQ_INIT_TIMEOUT (seconds, default 120): how long the processes wait for each other to connect. In the
explicit mode they first meet at the coordinator's port (`rendezvous`), so that a missing process, differing
counts or a repeated id is one sentence on every process instead of a fatal error inside XLA's runtime.

What is sharded (the README's "Scale"): a global batch of B images is split by rows, process p reading
only rows [p B / N, (p + 1) B / N) (`process_rows`), and the global array is assembled from the local
parts (`global_batch`); parameters are replicated (`replicated`); the search's population is split by
process and, within a process, over its local devices, and the losses are gathered (`gather_rows`) so that
every process tells its strategy the same numbers. Process 0 writes every file (`is_writer`), the others
wait for it (`barrier`); orbax checkpoints are saved by all processes together, as orbax requires.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_INIT_TIMEOUT_S = 120
ENV_KEYS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def requested(environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """The jax.distributed.initialize arguments the environment asks for, or None for one process.

  Raises ValueError (one sentence) for an incomplete or inconsistent request.
  """
  env = os.environ if environ is None else environ
  timeout = env.get('PICPQ_INIT_TIMEOUT', str(DEFAULT_INIT_TIMEOUT_S))
  try:
    timeout_s = int(timeout)
    assert timeout_s > 0
  except (ValueError, AssertionError):
    raise ValueError(f'PICPQ_INIT_TIMEOUT={timeout!r} is not a positive whole number of seconds; e.g. 120.') from None
  given = [k for k in ENV_KEYS if env.get(k)]
  if not given:
    if env.get('PICPQ_DISTRIBUTED', '') == 'auto':
      return {'initialization_timeout': timeout_s}
    if env.get('PICPQ_DISTRIBUTED'):
      raise ValueError(f'PICPQ_DISTRIBUTED={env["PICPQ_DISTRIBUTED"]!r} is not a setting; use PICPQ_DISTRIBUTED=auto '
                       '(the cluster found by JAX), or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                       'JAX_PROCESS_ID.')
    return None
  missing = [k for k in ENV_KEYS if not env.get(k)]
  if missing:
    raise ValueError(f'{", ".join(given)} set but not {", ".join(missing)}: a multi-process run needs all three '
                     '(e.g. JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 on the '
                     'first host), or none for one process.')
  try:
    count, index = int(env['JAX_NUM_PROCESSES']), int(env['JAX_PROCESS_ID'])
  except ValueError:
    raise ValueError(f'JAX_NUM_PROCESSES={env["JAX_NUM_PROCESSES"]!r} and JAX_PROCESS_ID={env["JAX_PROCESS_ID"]!r} '
                     'must be whole numbers.') from None
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'JAX_PROCESS_ID={index} is not one of the JAX_NUM_PROCESSES={count} processes; give each '
                     f'process its own id from 0 to {count - 1}.')
  address = env['JAX_COORDINATOR_ADDRESS']
  if ':' not in address:
    raise ValueError(f'JAX_COORDINATOR_ADDRESS={address!r} has no port; give host:port, e.g. 127.0.0.1:1234.')
  return {'coordinator_address': address, 'num_processes': count, 'process_id': index,
          'initialization_timeout': timeout_s}


def initialize(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """Start jax.distributed when the environment asks for it (`requested`), before any computation; returns
  the one-line description of the processes and devices (`describe`), or None for one process.

  A coordinator that does not answer, or processes that do not all connect, within PICPQ_INIT_TIMEOUT
  seconds is a ValueError naming the settings, on every process that waited.
  """
  args = requested(environ)
  if args is None:
    return None
  if _cpu_only():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  address, timeout_s = args.get('coordinator_address'), args['initialization_timeout']
  if address:
    # XLA's runtime ends a process itself (LOG(FATAL), no Python exception) when not every process connects
    # in time or the counts disagree: meet first, so that those are one sentence on every process.
    rendezvous(address, args['num_processes'], args['process_id'], timeout_s)
  else:  # the cluster JAX detects: this line is what the user reads above XLA's own message if one is missing
    print(f'starting the processes of the cluster JAX detects; each waits up to {timeout_s} s (PICPQ_INIT_TIMEOUT) '
          'for all of them to connect.', file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(**args)
  except Exception as e:  # pylint: disable=broad-except  # XLA's runtime errors have no narrower public type
    raise ValueError(f'could not start the processes with the coordinator at {address or "the detected cluster"} '
                     f'({" ".join(str(e).split())[:200]}); check JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                     'JAX_PROCESS_ID on every host.') from None
  return describe()


HELLO = 'picpq-hello'


def rendezvous(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
  """Every process of an explicit multi-process run (JAX_COORDINATOR_ADDRESS) meets at the coordinator's port
  before jax.distributed starts there: process 0 listens, each other process sends its id and count, and
  process 0 answers all once every id has arrived with the same count. Returns on every process when they
  all met; otherwise a ValueError (one sentence, the same on every process that reached process 0) naming
  the setting: a coordinator that never answers, ids missing after timeout_s, a count that differs, an id
  given twice. Process 0 then leaves the port to jax.distributed's coordinator service.
  """
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + timeout_s
  if process_id > 0:
    conn = _connect_until(host, int(port), deadline)
    if conn is None:
      raise ValueError(f'the coordinator at JAX_COORDINATOR_ADDRESS={address} did not answer within {timeout_s} s; '
                       'start process 0 there (JAX_PROCESS_ID=0) or fix the address, or raise PICPQ_INIT_TIMEOUT.')
    with conn:
      conn.sendall(f'{HELLO} {process_id} {num_processes}\n'.encode())
      conn.settimeout(timeout_s + 30)  # process 0 listened before this connection: it answers within timeout_s
      try:
        answer = conn.makefile().readline().strip()
      except OSError:
        answer = ''
    if answer != 'ok':
      raise ValueError(answer.partition(' ')[2] if answer.startswith('error ') else
                       f'process 0 at JAX_COORDINATOR_ADDRESS={address} ended without answering; see its message.')
    return
  try:
    server = socket.create_server(('', int(port)))
  except OSError as e:
    raise ValueError(f'process 0 cannot listen on port {port} of JAX_COORDINATOR_ADDRESS={address} ({e.strerror}); '
                     'another process 0 or program holds it: stop it or choose another port.') from None
  peers, error = {}, None
  with server:
    while len(peers) < num_processes - 1 and error is None:
      server.settimeout(max(deadline - time.monotonic(), 0.01))
      try:
        conn, _ = server.accept()
      except OSError:  # the deadline passed
        error = (f'only {len(peers) + 1} of JAX_NUM_PROCESSES={num_processes} processes (ids '
                 f'{sorted([0, *peers])}) reached the coordinator at {address} within {timeout_s} s '
                 f'(PICPQ_INIT_TIMEOUT); start every id from 0 to {num_processes - 1} or lower JAX_NUM_PROCESSES.')
        break
      conn.settimeout(5.0)
      try:
        words = conn.makefile().readline().split()
      except OSError:
        words = []
      if len(words) != 3 or words[0] != HELLO or not (words[1].isdigit() and words[2].isdigit()):
        conn.close()  # not one of ours (a port scan, a health check): ignored
        continue
      peer, count = int(words[1]), int(words[2])
      if count != num_processes:
        error = (f'process {peer} has JAX_NUM_PROCESSES={count} but process 0 has {num_processes}; give every '
                 'process the same JAX_NUM_PROCESSES.')
      elif peer in peers:
        error = f'two processes have JAX_PROCESS_ID={peer}; give each its own id from 0 to {num_processes - 1}.'
      peers.setdefault(peer, conn)
      if peers[peer] is not conn:
        _answer(conn, f'error {error}')
    for conn in peers.values():
      _answer(conn, 'ok' if error is None else f'error {error}')
  if error is not None:
    raise ValueError(error)


def _connect_until(host: str, port: int, deadline: float):
  """A TCP connection to host:port, retried until the monotonic `deadline`; None if none was made."""
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  while True:
    try:
      return socket.create_connection((host, port), timeout=1.0)
    except OSError:
      if time.monotonic() >= deadline:
        return None
      time.sleep(0.2)


def _answer(conn, line: str) -> None:
  """Send `line` and wait for the peer to close first (so the port is free again at once for jax.distributed's
  service: the side that closes first keeps the connection's TIME_WAIT)."""
  with conn:
    try:
      conn.sendall((line + '\n').encode())
      conn.settimeout(5.0)
      conn.recv(1)
    except OSError:
      pass


def start() -> None:
  """The entry points' first step, before anything imports a library that computes at import (evosax does,
  which starts a backend): `initialize`, its line printed to stderr; a bad setting or a failed start is
  `error: <sentence>` and exit 2, as every other bad input."""
  try:
    line = initialize()
  except ValueError as e:
    if os.environ.get('PICPQ_DEBUG'):
      raise
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  if line:
    print(line, file=sys.stderr, flush=True)


def _cpu_only() -> bool:
  """Whether this process will run on the CPU (no accelerator platform asked for or installed), read without
  starting a backend: jax.distributed must be initialized before the first backend starts."""
  platforms = os.environ.get('JAX_PLATFORMS', '') or jax.config.jax_platforms or ''
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  import importlib.util  # pylint: disable=g-import-not-at-top
  return not any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu',
                                                       'jax_rocm60_plugin'))


def describe() -> str:
  """Process index and count, local and global devices: one line."""
  return (f'process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of '
          f'{jax.device_count()} {jax.default_backend()} devices')


def is_writer() -> bool:
  """Whether this process writes files (process 0; the only one in a single-process run)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (after process 0 wrote a file the others may read)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def local_mesh() -> Mesh:
  """A 1-D mesh, axis 'data', over this process's devices (the search: candidates need no other process)."""
  return Mesh(np.array(jax.local_devices()), ('data',))


def process_rows(n: int) -> slice:
  """This process's rows of a global batch of n rows (n divisible by the process count: check_batch_size)."""
  count, index = jax.process_count(), jax.process_index()
  return slice(index * n // count, (index + 1) * n // count)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """The global arrays, split by rows over `mesh`'s 'data' axis, of which `local` holds this process's rows."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicated(tree: Any, mesh: Mesh) -> Any:
  """`tree` (the same values on every process) replicated on every device of `mesh`."""
  sharding = NamedSharding(mesh, P())
  if all(d.process_index == jax.process_index() for d in mesh.devices.flat):  # this process's devices only
    return jax.device_put(tree, sharding)
  host = jax.device_get(tree)  # any process-local placement first back to this host
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i, x=x: np.asarray(x)[i]),
                      host)


def gather_rows(tree: Any) -> Any:
  """Each process's (n, ...) numpy rows -> every process's rows, concatenated in process order."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
