"""orbax-checkpoint save/restore of every stage's state, with a JSON manifest to catch mismatches; and the one
atomic writer (`atomic_write`, `write_json`, `write_npz`) for every other file a run writes.

A stage directory holds numbered steps, each with the state pytree ('state') and a small JSON ('meta', e.g.
the architecture and the epoch). Orbax writes each step to a temporary directory and renames it when
complete, so a killed process never leaves a half-written step behind that restore would pick up.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint exists but does not belong to the run asking for it (e.g. another architecture)."""


def manager(directory: str, max_to_keep: Optional[int] = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def latest_step(mngr: ocp.CheckpointManager) -> Optional[int]:
  return mngr.latest_step()


def restore_meta(mngr: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore(mngr: ocp.CheckpointManager, target: Any, step: Optional[int] = None,
            expect: Optional[dict] = None) -> tuple[Any, dict]:
  """Restore the state at `step` (default latest) into the structure/shardings of `target` (None: as saved).

  expect: manifest entries that must match (e.g. {'arch': 'resnet20'}); a mismatch raises
  CheckpointMismatchError naming the entry, before any array is read.
  """
  step = mngr.latest_step() if step is None else step
  meta = restore_meta(mngr, step)
  for key, value in (expect or {}).items():
    if meta.get(key) != value:
      raise CheckpointMismatchError(
          f'the checkpoint in {mngr.directory} was written with {key}={meta.get(key)!r} but this run has '
          f'{key}={value!r}; use a fresh --workdir or the matching config.')
  abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return restored['state'], meta


# ----------------------------------------------------------------------------------------------------------
# The one atomic writer for every other file a run writes
# ----------------------------------------------------------------------------------------------------------


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
  """Call write(file) on a temporary file beside `path`, then rename it to `path`.

  A killed or failing write (disk full, an exception in `write`) leaves `path` as it was and no temporary
  file behind. Raises OSError as one sentence naming the file.
  """
  path = os.path.abspath(path)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
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
      raise OSError(f'could not write {path}: {e.strerror or e}; free some space or choose another '
                    '--workdir.') from None
    raise


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
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
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
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f'{path} is not a readable .npz ({e}); delete it to recompute that stage, or use a fresh '
                     '--workdir.') from None
