"""One run per run directory: the OS lock on RUN_DIR/.lock.flock, and RUN_DIR/.lock naming its holder.

A second `jaxft train` on the same directory refuses with the holder's host and pid. The OS releases the lock
when its process ends, however it ends, so there is no stale lock to judge on one host (judging one by its
pid raced: a lock file not yet written read as stale, and two processes could both take over the same one).
A `.lock` naming another host whose lock this host does not see (a file system without shared locks) can
only be judged by a person.
"""
import contextlib
import json
import os
import socket
from pathlib import Path

import filelock

from jaxft.errors import JaxftError


def _holder(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):  # absent, or being written
    return {}


def acquire(run_dir: Path) -> tuple[filelock.BaseFileLock, Path]:
  path, me = Path(run_dir) / ".lock", {"host": socket.gethostname(), "pid": os.getpid()}
  lock = filelock.FileLock(str(path) + ".flock")

  def in_use(holder: dict, hint: str = "") -> JaxftError:
    return JaxftError(f"run_dir {run_dir} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                      f"(lock {path}); wait for that run{hint}")
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    raise in_use(_holder(path)) from None
  holder = _holder(path)
  if holder and holder.get("host") != me["host"]:  # a lock this host's OS cannot see may still be held
    lock.release()
    raise in_use(holder, ", or remove the lock if it is gone")
  tmp = path.with_name(f".lock.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(me))
  tmp.replace(path)  # whole, never half-written
  return lock, path


@contextlib.contextmanager
def held(run_dir: Path, enabled: bool = True):
  """Holds the run dir's lock for the block (only process 0 of a multi-host run takes it)."""
  lock, path = acquire(run_dir) if enabled else (None, None)
  try:
    yield
  finally:
    if lock is not None:
      with contextlib.suppress(FileNotFoundError):
        path.unlink()
      lock.release()
