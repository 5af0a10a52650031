"""Metrics as JSON lines in the workdir (one object per line), mirrored to TensorBoard event files."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from picpq_jax import checkpoints


class MetricWriter:
  """Appends {'step', 'kind', 'time', **scalars} to <workdir>/<name>.jsonl; TensorBoard under <workdir>/tb."""

  def __init__(self, workdir: str, name: str = 'metrics', tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f'{name}.jsonl')
    self._tb = None
    if tensorboard:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tb', name))
      except Exception:  # TensorBoard is a convenience; the JSON lines are the record.
        self._tb = None

  def write(self, step: int, kind: str, scalars: Mapping[str, Any]) -> None:
    row = {'step': int(step), 'kind': kind, 'time': time.time(), **{k: checkpoints.json_value(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default():
        for k, v in row.items():
          if isinstance(v, float):
            tf.summary.scalar(f'{kind}/{k}', v, step=int(step))
      self._tb.flush()


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
