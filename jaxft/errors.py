"""What ends a command early: a user-facing error (a one-line message, exit 2), or a preemption signal
(its own exit code)."""
import signal

EXIT_CODES = {signal.SIGTERM: 75, signal.SIGINT: 130}  # 75: EX_TEMPFAIL, a scheduler may requeue on it


class JaxftError(Exception):
  """A user-facing error: bad config, missing file, unresolvable asset, bad checkpoint."""


class Preempted(Exception):
  """The loop stopped early on a signal, after its checkpoint committed."""

  def __init__(self, signum: int, step: int, checkpoint: str):
    self.exit_code = EXIT_CODES[signum]
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint {checkpoint} "
                     f"committed; run the same command to resume (exit {self.exit_code})")
