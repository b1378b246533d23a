"""Process-wide settings, applied by the `jaxft` command before jax starts its threads.

glibc's malloc serves large allocations (always those over 32 MiB) with mmap and gives them back with
munmap when they are freed. XLA's CPU runtime allocates each step's outputs and temporaries afresh, so every step touched
hundreds of MB of new pages: 93,000 page faults per MiniLM step at [32, 32] (0.36 GB zeroed by the
kernel), 13% of the step's time (benchmarks/NOTES.md, row 12). `tune_malloc` keeps freed memory in one
heap for reuse (one arena, no mmap, no trimming): the same step then faults 0 pages. The cost is that
the process keeps its peak heap until it exits, which a training process does anyway. The CLI applies it
where the steps run on the CPU (no accelerator on the machine).

libtpu installed on a machine without a TPU (for `jaxft plan`) must leave every other verb as it was:
`quiet_absent_tpu` keeps jax from trying the TPU, and `libtpu_compile_only` quiets libtpu's own start.
"""
import contextlib
import ctypes
import ctypes.util
import glob
import importlib.util
import logging
import os
import pkgutil
import sys
from pathlib import Path

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


# libtpu's settings for its compile-only use (jaxft plan) on a machine that is not a TPU VM: no metadata
# queries, no init warnings (the accelerator type only quiets one: compile-only topologies name theirs), and no
# machine-wide lock (/tmp/libtpu_lockfile), which only guards a real TPU against two processes.
LIBTPU_QUIET = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def tpu_present() -> bool:
  """Whether this machine has TPU chips: Google's PCI vendor id (as jax checks it), or /dev/accel* (v2 / v3)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if open(vendor).read().strip() == "0x1ae0":
        return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel*"))


def accelerator_present() -> bool:
  """A TPU, or an NVIDIA / AMD GPU (its driver's device files)."""
  return tpu_present() or bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/kfd"))


def quiet_absent_tpu() -> bool:
  """With libtpu installed on a machine without a TPU, every jax start would try the TPU and print libtpu's
  init errors. There, unless JAX_PLATFORMS is set, jax skips the TPU (keeping a GPU where a GPU plugin is
  installed). On a TPU host nothing changes. Call it before jax starts; True where applied."""
  if importlib.util.find_spec("libtpu") is None or tpu_present():
    return False
  plugins = {m.name for m in pkgutil.iter_modules()}
  gpus = [p for p in ("cuda", "rocm") if any(name.startswith(f"jax_{p}") for name in plugins)]
  os.environ.setdefault("JAX_PLATFORMS", ",".join(gpus + ["cpu"]))
  return True


@contextlib.contextmanager
def libtpu_compile_only():
  """Around libtpu's first load for compile-only topologies, on a machine without a TPU: its quiet settings
  (restored after: TPU_WORKER_HOSTNAMES would otherwise look like a TPU pod to jax.distributed)."""
  saved = {key: os.environ.get(key) for key in LIBTPU_QUIET}
  if not tpu_present():
    for key, value in LIBTPU_QUIET.items():
      os.environ.setdefault(key, value)
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


_ORBAX_LOG: list = []  # the file handler orbax's records go to, once a run directory has one (log_orbax_to)


def quiet_abandoned_writes() -> None:
  """For a process that saves checkpoints (the CLI): after a failed orbax save, TensorStore still completes the writes orbax
  abandoned and reports each to an event loop orbax has closed (hundreds of 'Event loop is closed' tracebacks,
  nothing lost), and orbax logs each writer thread's failure with its traceback, which the run reports itself in
  one line. Drops the first; the second goes to RUN_DIR/orbax.log (log_orbax_to), else to stderr in one line."""
  default = sys.unraisablehook

  def hook(u):
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
      default(u)

  def to_file(record: logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    if _ORBAX_LOG:
      _ORBAX_LOG[0].handle(record)
      return False
    record.exc_info, record.exc_text = None, None
    return True
  sys.unraisablehook = hook
  from absl import logging as absl_logging  # orbax logs through it (its own logger class: import it first)
  absl_logging.get_absl_logger().addFilter(to_file)


def log_orbax_to(path: Path) -> None:
  """orbax's log records (warnings and errors, with their tracebacks) go to `path` from now on, not to stderr."""
  handler = logging.FileHandler(path)
  handler.handleError = lambda record: None  # a full disk fails this file too: the run reports that in one line
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  if _ORBAX_LOG:
    _ORBAX_LOG.pop().close()
  _ORBAX_LOG.append(handler)
