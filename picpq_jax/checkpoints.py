"""orbax-checkpoint save/restore of every stage's state, with a JSON manifest to catch mismatches.

A stage directory holds numbered steps, each with the state pytree ('state') and a small JSON ('meta', e.g.
the architecture and the epoch). Orbax writes each step to a temporary directory and renames it when
complete, so a killed process never leaves a half-written step behind that restore would pick up.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
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
