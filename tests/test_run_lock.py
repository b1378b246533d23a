"""run_lock: of many processes starting on one run dir at once, exactly one holds it, however they interleave."""
import json
import socket
import subprocess
import sys
import time

TRY = """
import sys, time
from jaxft import run_lock
from jaxft.errors import JaxftError
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
try:
  with run_lock.held(sys.argv[1]):
    print("took", flush=True)
    time.sleep(3)
except JaxftError as e:
  print("refused" if "is in use by process" in str(e) else f"other: {e}", flush=True)
"""


def test_many_processes_one_holder(tmp_path):
  for round_ in range(3):  # a stale .lock from the round before is there from round 2 on
    start = time.time() + 4
    procs = [subprocess.Popen([sys.executable, "-c", TRY, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(8)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["refused"] * 7 + ["took"], (round_, outs)
    if round_ == 0:  # leave a stale lock file, as a killed holder would
      (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 999999}))
