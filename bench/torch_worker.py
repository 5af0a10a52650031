"""The JAX benches' handle on a PyTorch process (bench/torch_reference.py), so that PyTorch's figures are
measured in the same run as ours, interleaved round by round. torch is never imported here.

Which Python runs PyTorch: $TORCH_PYTHON if set, else this interpreter when it can import torch; with
neither, `TorchWorker.start()` returns None and the bench says what it skipped. The worker uses
$TORCH_THREADS threads (default: all cores, as XLA does).

  TORCH_PYTHON=/tmp/torchvenv/bin/python .venv/bin/python bench/bench_train_step.py
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, 'torch_reference.py')
ORIGINAL_ENV = 'PICPQ_ORIGINAL'  # a checkout of github.com/fanxxxxyi/PIC-PQ, for the original's own fitness


def torch_python() -> Optional[str]:
  """The interpreter that runs PyTorch, or None (see the module docstring)."""
  if os.environ.get('TORCH_PYTHON'):
    return os.environ['TORCH_PYTHON']
  return sys.executable if importlib.util.find_spec('torch') is not None else None


def skip_message() -> str:
  return ('PyTorch comparison skipped: torch is not importable here and TORCH_PYTHON is not set (e.g. '
          'TORCH_PYTHON=/path/to/venv-with-torch/bin/python; torch is never a requirement of picpq_jax).')


class TorchWorker:
  """One PyTorch process answering bench/torch_reference.py's commands: worker.call('steps', n=5)."""

  def __init__(self, python: str, threads: Optional[int] = None):
    env = dict(os.environ, TORCH_THREADS=str(threads or os.cpu_count() or 1))
    self._proc = subprocess.Popen([python, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=env)
    self.version = self.call('version')['torch']

  @classmethod
  def start(cls, threads: Optional[int] = None) -> Optional['TorchWorker']:
    python = torch_python()
    return cls(python, threads) if python else None

  def call(self, op: str, **kwargs) -> dict:
    self._proc.stdin.write(json.dumps({'op': op, **kwargs}) + '\n')
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the PyTorch worker ({SERVER}) exited during {op!r}')
    out = json.loads(line)
    if 'error' in out:
      raise RuntimeError(f'PyTorch worker, {op!r}: {out["error"]}')
    return out

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.write(json.dumps({'op': 'quit'}) + '\n')
      self._proc.stdin.flush()
      self._proc.wait(timeout=60)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
