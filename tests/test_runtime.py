"""runtime.tune_malloc: XLA's fresh per-call buffers reuse freed memory instead of faulting in new pages."""
import subprocess
import sys

PROGRAM = """
import resource, sys
from jaxft import runtime
applied = runtime.tune_malloc() if sys.argv[1] == "tuned" else None
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x) + 1.0)  # a new 64 MiB output each call
x = jnp.ones((4096, 4096))
for _ in range(30):  # the heap grows to its steady size
  jax.block_until_ready(f(x))
faults = []
for _ in range(9):  # the median call: a rare call that grows the heap once more does not count
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[4])
"""


def faults_per_call(mode):
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True, timeout=120)
  applied, faults = out.stdout.split()
  return applied, int(faults)


def test_tune_malloc_stops_page_faults_per_call():
  applied, tuned = faults_per_call("tuned")
  _, plain = faults_per_call("plain")
  assert applied == "True"
  assert plain > 8000  # glibc's defaults: over 32 MiB goes to mmap, 16,384 fresh 4 KiB pages a call
  assert tuned < 100, (tuned, plain)
