"""One run per run directory: RUN_DIR/.lock names the process that holds it.

A second `jaxft train` on the same directory refuses with the holder's host and pid. A lock whose process
is gone (on this host) is stale and taken over; one held from another host can only be judged by a person.
"""
import contextlib
import json
import os
import socket
from pathlib import Path

from jaxft.errors import JaxftError


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def acquire(run_dir: Path) -> Path:
  path, me = Path(run_dir) / ".lock", {"host": socket.gethostname(), "pid": os.getpid()}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        holder = json.loads(path.read_text())
      except (OSError, ValueError):  # removed meanwhile, or half-written by a process that died
        holder = {}
      if holder and (holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1)))):
        raise JaxftError(f"run_dir {run_dir} is in use by process {holder.get('pid')} on {holder.get('host')} "
                         f"(lock {path}); wait for that run, or remove the lock if it is gone") from None
      with contextlib.suppress(FileNotFoundError):  # stale: its process is gone
        path.unlink()
      continue
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(me))
    return path
  raise JaxftError(f"could not take the lock {path}: other processes keep taking it")


@contextlib.contextmanager
def held(run_dir: Path, enabled: bool = True):
  """Holds the run dir's lock for the block (only process 0 of a multi-host run takes it)."""
  path = acquire(run_dir) if enabled else None
  try:
    yield
  finally:
    if path is not None:
      with contextlib.suppress(FileNotFoundError):
        path.unlink()
