"""Preemption: SIGTERM or SIGINT end the run at a step boundary, with a committed checkpoint of that step.
During the test pass (training done, checkpoints saved) a signal cuts the pass: the rerun tests again.

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
    self.stage = "train"  # or "test": the test pass, which a signal cuts (test_multi: not multi-host)
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
    doing = {"train": "finishing the step in flight (and its validation) and saving a checkpoint",
             "test": "stopping the test pass (training is done and its checkpoints commit first; run the same "
                     "command to test)",
             "test_multi": "training is done; the test pass finishes first (every host runs it)"}[self.stage]
    os.write(2, f"\n{signal.Signals(signum).name}: {doing} (send it again to exit at once)\n".encode())
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # jax.distributed's notifier agrees on the step with every host

  def testing(self):
    """The test pass starts; returns its `stop` for evaluate (None multi-host: every host must run each batch)."""
    self.stage = "test_multi" if self._multi else "test"
    return None if self._multi else lambda: self.signum is not None

  def reached(self, step: int) -> bool:
    """Whether the run should stop after `step` (multi-host: every process gets True at the same step)."""
    if self._multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None
