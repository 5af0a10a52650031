"""Metrics as JSON lines in the workdir (one object per line), mirrored to TensorBoard event files."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from picpq_jax import checkpoints, hosts


class MetricWriter:
  """Appends {'step', 'kind', 'time', **scalars} to <workdir>/<name>.jsonl; TensorBoard under <workdir>/tb."""

  def __init__(self, workdir: str, name: str = 'metrics', tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f'{name}.jsonl')
    self._tb = None
    if tensorboard and hosts.is_writer():
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tb', name))
      except Exception:  # TensorBoard is a convenience; the JSON lines are the record.
        self._tb = None

  def write(self, step: int, kind: str, scalars: Mapping[str, Any]) -> None:
    if not hosts.is_writer():  # every process computes the same metrics; one writes them
      return
    row = {'step': int(step), 'kind': kind, 'time': time.time(), **{k: checkpoints.json_value(v) for k, v in scalars.items()}}
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    except OSError as e:
      raise OSError(f'could not write {self.path}: {e.strerror or e}; {checkpoints.way_out(e)}') from None
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      try:
        with self._tb.as_default():
          for k, v in row.items():
            if isinstance(v, float):
              tf.summary.scalar(f'{kind}/{k}', v, step=int(step))
        self._tb.flush()
      except Exception:  # pylint: disable=broad-except  # e.g. a full disk: the JSON lines are the record
        self._tb = None

  def keep_rows(self, keep) -> None:
    """Drop the rows `keep(row)` rejects (e.g. those of an epoch a resumed run does again) and any row cut
    short, atomically; writes nothing when every row stays."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a row cut short by a killed process
        continue
      if keep(row):
        kept.append(line if line.endswith('\n') else line + '\n')
    if kept != lines:
      checkpoints.atomic_write(self.path, lambda f: f.writelines(kept))


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
