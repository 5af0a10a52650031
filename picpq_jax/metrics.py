"""Metrics as JSON lines in the workdir (one object per line), mirrored to TensorBoard event files.

The event files are written with TensorBoard's own record framing and protos (as torch's SummaryWriter
does), not tf.summary: importing TensorFlow costs every entry point ~13 CPU-seconds, and mnist5k never
needs it otherwise.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
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
        self._tb = _EventFile(os.path.join(workdir, 'tb', name))
      except Exception:  # pylint: disable=broad-except  # TensorBoard is a convenience; the JSON lines are the record.
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
      try:
        self._tb.add_event(_scalars_event(int(step), kind, row))
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


class _EventFile:
  """A TensorBoard event file, appended to and closed at every event: TensorBoard's RecordWriter (TFRecord
  framing with masked CRCs) over a plain file. Its EventFileWriter would go through tf.io.gfile, i.e. import
  TensorFlow, and keep a thread and an open file per writer."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_COUNTER)}'
    self.path = os.path.join(logdir, name)
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def add_event(self, event) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    with open(self.path, 'ab') as f:
      RecordWriter(f).write(event.SerializeToString())


_FILE_COUNTER = itertools.count()  # two writers of one stage in one second still get two files


def _scalars_event(step: int, kind: str, row: Mapping[str, Any]):
  """One TensorBoard event holding the row's float scalars, tagged '<kind>/<key>' (tf.summary.scalar's tags)."""
  from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
  values = [summary_pb2.Summary.Value(tag=f'{kind}/{k}', simple_value=v) for k, v in row.items()
            if isinstance(v, float)]
  return event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
