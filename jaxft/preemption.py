"""Preemption: SIGTERM or SIGINT end the run at a step boundary, with a committed checkpoint of that step.

The first signal asks the loop to stop after the step in flight; it saves that step, waits for the save to
commit and raises `Preempted`, which the CLI turns into exit code 75 (SIGTERM, EX_TEMPFAIL: a scheduler may
requeue on it; rerunning the same command resumes exactly) or 130 (Ctrl-C). A second signal exits at once;
orbax commits a checkpoint by renaming its directory, so the earlier ones stay intact.

Multi-host, all processes must save the same step: there jax.distributed owns SIGTERM (its preemption
notifier tells every process) and `multihost_utils.reached_preemption_sync_point` names the step; a Ctrl-C
on one process is forwarded to that mechanism as a SIGTERM to itself.
"""
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from jaxft.errors import EXIT_CODES


class Watcher:
  """While entered, catches SIGTERM / SIGINT; `reached(step)` says whether to stop after `step`."""

  def __init__(self):
    self.signum = None
    self._multi = jax.process_count() > 1
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
      for s in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._on_signal)
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)

  def _on_signal(self, signum, frame):
    if self.signum is not None:
      os.write(2, f"\n{signal.Signals(signum).name} again: exiting now, without saving\n".encode())
      os._exit(EXIT_CODES[signum])
    self.signum = signum
    os.write(2, f"\n{signal.Signals(signum).name}: finishing the step in flight and saving a checkpoint "
                "(send it again to exit at once)\n".encode())
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # jax.distributed's notifier agrees on the step with every host

  def reached(self, step: int) -> bool:
    """Whether the run should stop after `step` (multi-host: every process gets True at the same step)."""
    if self._multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None
