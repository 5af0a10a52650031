"""xla_setup.keep_freed_memory: a large buffer freed by one thread is the next one's, with no page faults;
xla_setup.release_freed_memory: the pages of a freed buffer go back to the system."""
import os
import platform
import subprocess
import sys

import pytest

# A 64 MiB buffer written by a worker thread, freed, then written again by another thread (as XLA's runtime
# allocates each step's temporary buffer): prints the minor page faults of the second.
SCRIPT = r'''
import ctypes, resource, sys, threading
from picpq_jax import xla_setup
if sys.argv[1] == 'kept':
  assert xla_setup.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
faults = []
def touch():
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(64 << 20)
  ctypes.memset(p, 1, 64 << 20)  # every page written
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  libc.free(p)
for _ in range(2):
  t = threading.Thread(target=touch)
  t.start()
  t.join()
print(faults[1])
'''
PAGES = (64 << 20) // 4096  # the buffer in 4 KiB pages (32 pages where the kernel backs it with 2 MiB ones)


def run_script(script: str, *args: str) -> list[str]:
  """What `script` prints, run in a new Python without a user's MALLOC_ARENA_MAX (which turns the setting off)."""
  env = {k: v for k, v in os.environ.items() if k != 'MALLOC_ARENA_MAX'}
  out = subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True, check=True, env=env)
  return out.stdout.split()


def second_buffer_faults(memory: str) -> int:
  return int(run_script(SCRIPT, memory)[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='keep_freed_memory sets glibc malloc options only')
def test_keep_freed_memory_reuses_a_freed_buffer_without_page_faults():
  # glibc's default maps a thread's 64 MiB afresh and unmaps it when freed: every page faults in again.
  assert second_buffer_faults('returned') >= (64 << 20) // (2 << 20)
  assert second_buffer_faults('kept') < 0.01 * PAGES


def test_keep_freed_memory_leaves_a_users_malloc_setting(monkeypatch):
  from picpq_jax import xla_setup  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('MALLOC_ARENA_MAX', '4')
  assert not xla_setup.keep_freed_memory()


# A 64 MiB buffer written, then a small one allocated after it (so the big one's memory is a hole inside the
# heap, as a stage's buffers leave, not its top), the big one freed: prints the resident MiB before and after
# release_freed_memory.
RELEASE_SCRIPT = r'''
import ctypes, os
from picpq_jax import xla_setup
assert xla_setup.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
def resident_mib():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
big = libc.malloc(64 << 20)
ctypes.memset(big, 1, 64 << 20)
small = libc.malloc(4096)
libc.free(big)
before = resident_mib()
xla_setup.release_freed_memory()
print(before, resident_mib())
'''


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='release_freed_memory calls glibc malloc_trim')
def test_release_freed_memory_returns_a_freed_hole_of_the_heap():
  before, after = map(float, run_script(RELEASE_SCRIPT)[-2:])
  assert before - after > 60  # MiB: the 64 MiB hole, less the pages at its ends that share live chunks
