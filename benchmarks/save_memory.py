"""Host memory of jaxft's orbax saves, outside training (benchmarks/RESULTS.md, issue 35): a 0.75 GiB state of
random float32 arrays saved twice by jaxft.checkpoint.Checkpointer; RSS when save() returns, its peak (sampled
every 20 ms) until the save commits, and after.

  python benchmarks/save_memory.py [DIR]     # DIR: where the checkpoints go (default /tmp/jaxft_save_memory)
"""
import shutil
import sys
import threading
import time

import jax

from jaxft.checkpoint import Checkpointer
from jaxft.runs import RunRecord


def rss_gib() -> float:
  return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30


directory = sys.argv[1] if len(sys.argv) > 1 else "/tmp/jaxft_save_memory"
shutil.rmtree(directory, ignore_errors=True)
state = {f"w{i}": jax.random.normal(jax.random.key(i), (64, 1024, 1024)) for i in range(3)}  # 3 x 0.25 GiB
jax.block_until_ready(state)
peak, done = [0.0], threading.Event()


def watch():
  while not done.is_set():
    peak[0] = max(peak[0], rss_gib())
    time.sleep(0.02)


threading.Thread(target=watch, daemon=True).start()
print(f"state 0.75 GiB; RSS before the first save {rss_gib():.2f} GiB")
ckpt = Checkpointer(directory, keep=1)
for step in (1, 2):
  peak[0], t = 0.0, time.perf_counter()
  ckpt.save(step, state, {}, RunRecord(labels=[]))
  on_return = rss_gib()
  ckpt.wait()
  print(f"save {step}: RSS {on_return:.2f} GiB when save() returns, peak {peak[0]:.2f} until committed, "
        f"{rss_gib():.2f} after ({time.perf_counter() - t:.1f} s)")
done.set()
shutil.rmtree(directory, ignore_errors=True)
