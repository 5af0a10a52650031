"""The metric writer's TensorBoard mirror: event files TensorBoard reads, written without TensorFlow."""
import glob
import struct
import subprocess
import sys

from tensorboard.compat.proto import event_pb2

from picpq_jax.metrics import MetricWriter, read_jsonl


def _events(path):
  """Events of a TFRecord file, parsed by hand: uint64 length, its crc, the bytes, their crc."""
  events = []
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      events.append(event_pb2.Event.FromString(f.read(length)))
      f.read(4)
  return events


def test_scalars_reach_tensorboard_with_the_json_lines_values(tmp_path):
  writer = MetricWriter(str(tmp_path), name='stage')
  writer.write(3, 'epoch', {'val_accuracy': 0.875, 'epoch': 1, 'note': 'text'})
  writer.write(6, 'epoch', {'val_accuracy': 0.9375, 'epoch': 2, 'note': 'text'})
  files = glob.glob(str(tmp_path / 'tb' / 'stage' / 'events.out.tfevents.*'))
  assert len(files) == 1
  scalars = [(e.step, v.tag, v.simple_value) for e in _events(files[0]) for v in e.summary.value]
  rows = read_jsonl(str(tmp_path / 'stage.jsonl'))
  # The float values only (what tf.summary.scalar was given): not 'epoch' (int) nor 'note'.
  assert [(s, t) for s, t, _ in scalars] == [(3, 'epoch/time'), (3, 'epoch/val_accuracy'),
                                             (6, 'epoch/time'), (6, 'epoch/val_accuracy')]
  assert [x for _, t, x in scalars if t == 'epoch/val_accuracy'] == [0.875, 0.9375]
  for (_, _, x), row in zip(scalars[::2], rows):  # simple_value is a float32: ~2e9 s to within 128 s
    assert abs(x - row['time']) <= 128


def test_writing_metrics_does_not_import_tensorflow(tmp_path):
  code = ('import sys; from picpq_jax.metrics import MetricWriter; '
          f'MetricWriter({str(tmp_path)!r}).write(0, "k", {{"x": 1.0}}); '
          'print(any(m.split(".")[0] == "tensorflow" for m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False'
