"""Process-wide settings for speed, applied by the `jaxft` command before jax starts its threads.

glibc's malloc serves large allocations (always those over 32 MiB) with mmap and gives them back with
munmap when they are freed. XLA's CPU runtime allocates each step's outputs and temporaries afresh, so every step touched
hundreds of MB of new pages: 93,000 page faults per MiniLM step at [32, 32] (0.36 GB zeroed by the
kernel), 13% of the step's time (benchmarks/NOTES.md, row 12). `tune_malloc` keeps freed memory in one
heap for reuse (one arena, no mmap, no trimming): the same step then faults 0 pages. The cost is that
the process keeps its peak heap until it exits, which a training process does anyway.
"""
import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_malloc() -> bool:
  """Makes glibc's malloc reuse freed memory instead of returning it to the OS; True where applied
  (glibc only; elsewhere a no-op). Call it before jax starts: arenas created earlier keep their ways."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # noqa: B018 (glibc, not musl or macOS)
  except (OSError, AttributeError, TypeError):
    return False
  return all(libc.mallopt(option, value) == 1 for option, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
