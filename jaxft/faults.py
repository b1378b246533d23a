"""Fault injection for tests/test_faults.py and benchmarks/torture.py; inert unless JAXFT_FAULT is set.

JAXFT_FAULT=WHEN:STEP:SIG[,...] makes the run send itself SIGSIG (TERM, INT or KILL) right after step STEP
is dispatched (WHEN=step), while the checkpoint of step STEP is being written (WHEN=save), or as the test pass
after the last step, STEP, begins (WHEN=test).
"""
import os
import signal


def inject(when: str, step: int) -> None:
  for spec in filter(None, os.environ.get("JAXFT_FAULT", "").split(",")):
    w, s, sig = spec.split(":")
    if w == when and int(s) == step:
      os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
