"""orbax-checkpoint save/restore of every stage's state, with a JSON manifest to catch mismatches and a checksum
of the arrays to catch damage; and the one atomic writer (`atomic_write`, `write_json`, `write_npz`) for every
other file a run writes.

A stage directory holds numbered steps, each with the state pytree ('state') and a small JSON ('meta', e.g.
the architecture, the epoch and `array_checksum` of the state). Orbax writes each step to a temporary
directory and renames it when complete, so a killed process never leaves a half-written step behind that
restore would pick up; a step damaged later (a flipped byte, a truncated file) fails its checksum or its read
on restore, and the newest intact step is used instead (`restore`), or, where a particular step is asked for,
the damage is one sentence naming the directory.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from picpq_jax import hosts

CHECKSUM = 'checksum'  # the meta entry holding array_checksum(state)


class CheckpointMismatchError(ValueError):
  """A checkpoint exists but does not belong to the run asking for it (e.g. another architecture)."""


class CheckpointDamagedError(ValueError):
  """A checkpoint whose arrays fail their checksum or cannot be read. path: the step's directory."""

  def __init__(self, message: str, path: str = '', reason: str = ''):
    super().__init__(message)
    self.path, self.reason = path, reason


def manager(directory: str, max_to_keep: Optional[int] = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'meta'))


def array_checksum(tree: Any) -> Optional[str]:
  """SHA-256 over every array leaf of `tree` (dtype, shape and bytes), independent of the containers holding
  them (a saved TrainState and the dicts and lists orbax restores it as give the same checksum). A replicated
  array of many processes is read from this process's copy; None when a leaf is split over processes (not
  checked)."""
  digests = []
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        return None
      leaf = leaf.addressable_data(0)
    a = np.ascontiguousarray(np.asarray(leaf))
    digests.append(hashlib.sha256(f'{a.dtype.str}{a.shape}'.encode() + a.tobytes()).hexdigest())
  return hashlib.sha256(''.join(sorted(digests)).encode()).hexdigest()


def _disk_error(error: BaseException) -> Optional[OSError]:
  """The OSError behind `error` (itself, or in its chain of causes), if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def _orbax_quiet():
  """orbax's own error logs (with the tracebacks of its worker threads) off for a moment: a failed save or a
  damaged step becomes one sentence here instead."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  before, hook = logging.get_verbosity(), sys.unraisablehook
  logging.set_verbosity(logging.FATAL)
  sys.unraisablehook = lambda unraisable: None  # tensorstore's callbacks into the closed loop of a failed save
  try:
    yield
  except BaseException:
    gc.collect()  # orbax's abandoned reads and writes, collected while their complaints are off
    raise
  finally:
    logging.set_verbosity(before)
    sys.unraisablehook = hook


def _remove_temporary_steps(directory: str) -> None:
  """orbax's unfinished step directories (`<step>.orbax-checkpoint-tmp-*`) left by a failed save."""
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if '.orbax-checkpoint-tmp' in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Save `state` and `meta` (plus the state's array_checksum) as `step`; a full disk or another OS error is
  one sentence naming the directory, and no unfinished step is left behind."""
  meta = {**meta, CHECKSUM: array_checksum(state)}
  try:
    with _orbax_quiet():
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)), force=True)
      mngr.wait_until_finished()
  except Exception as e:  # orbax wraps the OS error of a failed write in its own exceptions
    cause = _disk_error(e)
    if cause is None and 'No space left' not in str(e):
      raise
    _remove_temporary_steps(str(mngr.directory))
    # orbax's abandoned write tasks would each log their traceback when collected: the sentence below says it.
    logging.getLogger('asyncio').disabled = True
    reason = os.strerror(errno.ENOSPC) if cause is None else (cause.strerror or str(cause))
    raise OSError(f'could not write the checkpoint {mngr.directory}/{step}: {reason}; '
                  f'{way_out(cause)}') from None


def latest_step(mngr: ocp.CheckpointManager) -> Optional[int]:
  return mngr.latest_step()


def restore_meta(mngr: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def _restore_step(mngr: ocp.CheckpointManager, target: Any, step: int, expect: Optional[dict]) -> tuple[Any, dict]:
  """The state and meta of `step`; CheckpointMismatchError for a manifest mismatch, CheckpointDamagedError for
  a step that cannot be read or fails its checksum."""
  path = os.path.join(str(mngr.directory), str(step))
  try:
    with _orbax_quiet():
      meta = restore_meta(mngr, step)
  except Exception:  # pylint: disable=broad-except  # a garbled or missing meta file: many kinds of error
    raise _damaged(path, 'its meta file cannot be read') from None
  for key, value in (expect or {}).items():
    if meta.get(key) != value:
      raise CheckpointMismatchError(
          f'the checkpoint in {mngr.directory} was written with {key}={meta.get(key)!r} but this run has '
          f'{key}={value!r}; use a fresh --workdir or the matching config.')
  try:
    with _orbax_quiet():
      if target is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      elif jax.process_count() > 1:
        abstract = _on_this_process(os.path.join(path, 'state'))
      else:
        abstract = None  # as saved
      state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
  except Exception:  # pylint: disable=broad-except  # a truncated or garbled array file: plain Exceptions
    raise _damaged(path, 'its array files cannot be read: truncated or garbled') from None
  saved = meta.get(CHECKSUM)
  if saved is not None:
    got = array_checksum(state)
    if got is not None and got != saved:
      raise _damaged(path, 'its arrays do not match the checksum saved with them')
  return state, meta


def _on_this_process(item_dir: str) -> Any:
  """The saved arrays' shapes and dtypes, each placed whole on this process's first device: with many processes
  a checkpoint's saved placement (another run's devices) need not exist, and the caller wants host arrays."""
  metadata = ocp.StandardCheckpointer().metadata(item_dir)
  tree = getattr(getattr(metadata, 'item_metadata', metadata), 'tree', metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
                      is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:200]


def _damaged(path: str, reason: str) -> CheckpointDamagedError:
  return CheckpointDamagedError(f'the checkpoint {path} is damaged ({reason}); recompute the stage that wrote it '
                                'or use a fresh --workdir.', path, reason)


def restore(mngr: ocp.CheckpointManager, target: Any, step: Optional[int] = None,
            expect: Optional[dict] = None) -> tuple[Any, dict]:
  """Restore the state at `step` into the structure/shardings of `target` (None: as saved), with its meta.

  step None: the newest intact step. A damaged newer step (unreadable, or arrays that fail the checksum saved
  with them) is reported in one line on stderr and deleted, so that the stage resumes from the step before it
  and saves over it again; CheckpointDamagedError when no intact step is left. A given `step` must be intact
  (CheckpointDamagedError otherwise). expect: manifest entries that must match (e.g. {'arch': 'resnet20'}); a
  mismatch raises CheckpointMismatchError naming the entry, before any array is read.
  """
  if step is not None:
    return _restore_step(mngr, target, step, expect)
  damaged = []
  for candidate in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = _restore_step(mngr, target, candidate, expect)
    except CheckpointDamagedError as e:
      damaged.append(e)
      continue
    for e in damaged:
      print(f'warning: {e.path} is damaged ({e.reason}); it is removed and the stage resumes from step '
            f'{candidate}.', file=sys.stderr)
      try:
        mngr.delete(int(os.path.basename(e.path)))
      except Exception:  # pylint: disable=broad-except  # a read-only directory: the step just stays
        pass
    return restored
  if not damaged:
    raise FileNotFoundError(f'no checkpoint in {mngr.directory}.')
  raise CheckpointDamagedError(
      f'every checkpoint in {mngr.directory} is damaged (step {os.path.basename(damaged[0].path)}: '
      f'{damaged[0].reason}); recompute the stage that wrote it or use a fresh --workdir.',
      damaged[0].path, damaged[0].reason)


# ----------------------------------------------------------------------------------------------------------
# The one atomic writer for every other file a run writes
# ----------------------------------------------------------------------------------------------------------


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
  """Call write(file) on a temporary file beside `path`, then rename it to `path`.

  A killed or failing write (disk full, an exception in `write`) leaves `path` as it was and no temporary
  file behind. Raises OSError as one sentence naming the file. With many processes only process 0 writes:
  it starts once every process has come here (so none looked for the file after it appeared) and every
  process returns once it is written (hosts.barrier).
  """
  path = os.path.abspath(path)
  hosts.barrier('before writing ' + path)
  try:
    if hosts.is_writer():
      _write_file(path, write, binary)
  finally:
    hosts.barrier('wrote ' + path)


def _write_file(path: str, write: Callable[[Any], None], binary: bool) -> None:
  directory = os.path.dirname(path)
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  except OSError as e:
    raise OSError(f'could not write {path}: {e.strerror or e}; {way_out(e)}') from None
  try:
    with os.fdopen(fd, 'wb' if binary else 'w') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())  # the data is on disk before the rename makes it the result
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise OSError(f'could not write {path}: {e.strerror or e}; {way_out(e)}') from None
    raise


def way_out(error: Optional[OSError]) -> str:
  """What to do about a failed write: free space for a full disk, another --workdir otherwise."""
  if error is None or getattr(error, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):
    return 'free some space there, or choose another --workdir, and rerun (the run resumes).'
  return 'choose a --workdir you can write to.'


def json_value(value: Any) -> Any:
  """A value JSON can hold: arrays as lists, numpy scalars as floats, anything else unknown as its str."""
  if isinstance(value, np.ndarray):
    return value.tolist()
  try:
    return float(value) if not isinstance(value, (str, bool, int)) else value
  except (TypeError, ValueError):
    return str(value)


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON in `path`, atomically (numpy scalars and arrays become numbers and lists)."""
  atomic_write(path, lambda f: json.dump(obj, f, indent=1, default=json_value))


def read_json(path: str) -> Any:
  """The JSON in `path`; a damaged file is a ValueError naming it and the way out."""
  with open(path, 'rb') as f:
    try:
      return json.loads(f.read().decode('utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{path} is not valid JSON ({e}); delete it to recompute that stage, or use a fresh '
                       '--workdir.') from None


def write_npz(path: str, arrays: Mapping[str, Any]) -> None:
  """Arrays in an uncompressed .npz at `path`, atomically."""
  atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}), binary=True)


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of the .npz at `path` (loaded, the file closed); a damaged file is a ValueError naming it."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # zipfile, zlib, numpy and OS errors alike
    e = _first_line(e)
    raise ValueError(f'{path} is not a readable .npz ({e}); delete it to recompute that stage, or use a fresh '
                     '--workdir.') from None
