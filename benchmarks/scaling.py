"""Step time and examples/s per parallel strategy and device count.

  python benchmarks/scaling.py [--devices 1,2,4,8] [--model default|tiny] [--steps 8]

Each (device count) runs in its own process with that many devices (on CPU: fake devices from
--xla_force_host_platform_device_count, which share the same cores, so CPU numbers are a correctness
harness for the sharded step, not a speed-up measurement). On a GPU/TPU host the real devices are used.
"""
import argparse
import json
import os
import subprocess
import sys
import time

STRATEGIES = {  # name -> (overrides, minimum devices)
    "dp (jit)": ("parallel.mesh.data=-1",),
    "fsdp": ("parallel.mesh.data=1", "parallel.mesh.fsdp=-1"),
    "tp": ("parallel.mesh.data=1", "parallel.mesh.tensor=-1"),
    "dp+tp": ("parallel.mesh.data=-1", "parallel.mesh.tensor=2"),
    "pmap": ("parallel.backend=pmap",),
}


def worker(n_steps, overrides):
  import jax
  import numpy as np

  from jaxft import bench, parallel
  from jaxft.config import load_config
  from jaxft.experiment import build
  cfg = load_config(None, tuple(overrides))
  exp = build(cfg, log=lambda *_: None)
  par = parallel.Parallel(cfg, parallel.make_mesh(cfg.parallel.mesh), exp.conventions.tensor_parallel)
  target = par.abstract_state(exp.initial_state())
  step = par.compile_train(exp.train_step(0, "batch" if par.pmap else None), target)
  state = par.put_state(exp.initial_state(), target)
  src = bench.real_batches(exp, cfg.train.batch_size, cfg.data.max_length, n_steps + 1)
  times = []
  for i in range(n_steps + 1):
    batch = par.put_batch(src(i))
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  ms = 1000 * float(np.median(times[1:]))
  return {"devices": jax.device_count(), "device": jax.devices()[0].device_kind, "ms": ms,
          "examples_per_s": cfg.train.batch_size * 1000 / ms}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=64)
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(worker(args.steps, json.loads(args.worker))), flush=True)
    return
  common = (f"train.batch_size={args.batch}", f"data.max_length={args.length}", f"data.buckets=[{args.length}]")
  print("| strategy | devices | ms/step | examples/s |\n|---|---|---|---|")
  for n in map(int, args.devices.split(",")):
    for name, overrides in STRATEGIES.items():
      if n == 1 and name != "dp (jit)":
        continue
      env = dict(os.environ)
      if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu"):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
      out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                            "--worker", json.dumps(common + overrides)], env=env, capture_output=True,
                           text=True, timeout=1200)
      line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
      if line is None:
        print(f"| {name} | {n} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:80]} | |")
        continue
      r = json.loads(line[7:])
      print(f"| {name} | {r['devices']} | {r['ms']:.0f} | {r['examples_per_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
