"""Where a config's train step spends its time: a jax.profiler trace of the compiled step, summed by op.

  python benchmarks/profile_step.py [CONFIG] [overrides ...] [--batch 32] [--length 128] [--steps 2] [--data real]

--data synthetic (default): a [batch, length] batch of random tokens, every position trained; --data real:
the run's first training batch (packed or bucketed as `jaxft train` makes it; --length is not used).

Each thunk in the trace is matched to its instruction in the optimised HLO and grouped as `dot OUT_SHAPE`
(matmuls) or `elementwise OUT_SHAPE` (everything else), so the table reads like the profile in
benchmarks/NOTES.md. On a noisy machine compare variants with peers.py, not with two runs of this.
"""
import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

from jaxft import runtime

runtime.tune_malloc()
import jax

from jaxft import bench
from jaxft.config import load_config
from jaxft.experiment import build


def main():
  p = argparse.ArgumentParser()
  p.add_argument("config", nargs="?")
  p.add_argument("overrides", nargs="*")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
  args = p.parse_args()
  if args.config and "=" in args.config:
    args.overrides, args.config = [args.config] + args.overrides, None
  cfg = load_config(args.config, tuple(args.overrides) + (f"train.batch_size={args.batch}",))
  exp = build(cfg, log=lambda *_: None)
  batch = exp.train_batches()[0] if args.data == "real" else bench.synthetic_batch(exp, args.batch, args.length)
  # One executable both runs and gives the HLO, so the trace's thunk names are its instructions.
  step = jax.jit(exp.train_step(), donate_argnums=0
                 ).lower(exp.initial_state(), batch).compile()
  hlo = step.as_text()
  state = exp.initial_state()
  for _ in range(2):  # warm up
    state, m = step(state, batch)
  jax.block_until_ready(m)

  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(args.steps):
    state, m = step(state, batch)
    jax.block_until_ready(m)
  jax.profiler.stop_trace()
  events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events

  entry = hlo[hlo.index("ENTRY"):]
  kind = {}  # instruction name -> group
  for line in entry.splitlines():
    if (found := re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])", line)):
      name, shape = found.groups()
      is_dot = name.startswith(("ynn_fusion", "xnn_fusion", "dot")) or "custom-call" in line
      kind[name] = f"{'dot' if is_dot else 'elementwise'} {shape}"
  total = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in kind:
      total[kind[e["name"]]] += e.get("dur", 0) / 1e3 / args.steps
  shape = "x".join(map(str, batch["input_ids"].shape)) if "input_ids" in batch else args.batch
  print(f"{cfg.model.name}: {args.data} batch {shape}; {sum(total.values()):,.0f} ms per step in ops")
  for group, ms in total.most_common(25):
    print(f"{ms:8.1f} ms  {group}")


if __name__ == "__main__":
  main()
