"""A sweep in one run against the same sweep as sequential runs, on this machine (issue 35, §3).

  python benchmarks/sweep_vs_sequential.py one  [--sweep YAML] [--seeds N] [--prune YAML] [--out runs/sweep_bench]
  python benchmarks/sweep_vs_sequential.py each [--sweep YAML] [--seeds N] [--take I,J,...] [--out runs/sweep_bench]

`one`: `jaxft train train.sweep=... train.seeds=N` (one process, one compiled step); `each`: one `jaxft train` per
(setting, seed), one after another, as a user without sweeps would run them. Each prints its wall time and the
test accuracy of every (setting, seed), and appends them to OUT/results.jsonl. Run nothing else meanwhile.
`each --take`: only those runs of the (setting, seed) list (in `each`'s order); every run is the same program
on as many examples, so the mean wall of the runs taken times the list's length estimates the whole
(`est_wall_s`, labelled an estimate in the output).
"""
import argparse
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

SWEEP = "{optim.lr: [1e-4, 2e-4, 3e-4], optim.b2: [0.98, 0.999], optim.warmup_ratio: [0.06, 0.1]}"


def jaxft_train(*overrides: str) -> tuple[float, str]:
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", *overrides, "--no-resume"], capture_output=True,
                     text=True)
  wall = time.perf_counter() - t0
  if r.returncode:
    sys.exit(f"jaxft train {' '.join(overrides)}: exit {r.returncode}\n{r.stderr[-3000:]}")
  return wall, r.stdout


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("how", choices=("one", "each"))
  ap.add_argument("--sweep", default=SWEEP)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--prune", default=None, help="train.sweep_prune, e.g. '{at: [0.25, 0.5], keep: 0.5}' (one)")
  ap.add_argument("--take", default=None, help="each: only these runs of the (setting, seed) list, e.g. 0,17,35")
  ap.add_argument("--out", default="runs/sweep_bench")
  ap.add_argument("overrides", nargs="*", help="more overrides for every run")
  args = ap.parse_intermixed_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  sweep = yaml.safe_load(args.sweep)
  if args.how == "one":
    prune = [f"train.sweep_prune={args.prune}"] if args.prune else []
    wall, stdout = jaxft_train(f"train.sweep={args.sweep}", f"train.seeds={args.seeds}", *prune,
                               f"run_dir={out / ('one_pruned' if args.prune else 'one')}", *args.overrides)
    table = stdout[stdout.index("setting"):].strip()
    result = {"how": "one", "prune": args.prune, "wall_s": round(wall, 1), "table": table}
    print(table)
  else:
    keys, test, walls = list(sweep), {}, {}
    runs = [(" ".join(f"{k}={v}" for k, v in zip(keys, values)), seed)
            for values in itertools.product(*(sweep[k] for k in keys)) for seed in range(args.seeds)]
    take = [int(i) for i in args.take.split(",")] if args.take else range(len(runs))
    t0 = time.perf_counter()
    for i in take:
      setting, seed = runs[i]
      name = f"{setting} seed={seed}"
      walls[name], stdout = jaxft_train(*setting.split(), f"seed={seed}", f"run_dir={out / 'each'}", *args.overrides)
      test[name] = float(re.search(r"^test .*?accuracy ([\d.]+)", stdout, re.M).group(1))
      print(f"{name}: test accuracy {test[name]:.4f} in {walls[name]:.0f} s", flush=True)
    result = {"how": "each", "wall_s": round(time.perf_counter() - t0, 1), "test": test,
              "run_wall_s": {k: round(v, 1) for k, v in walls.items()}}
    if len(take) < len(runs):
      result["est_wall_s"] = round(len(runs) * sum(walls.values()) / len(walls), 1)
      print(f"each: {len(take)} of {len(runs)} runs; all {len(runs)}: {result['est_wall_s']:.0f} s wall (estimate: "
            f"{len(runs)} x their mean)")
  result.update(sweep=args.sweep, seeds=args.seeds, overrides=args.overrides, date=time.strftime("%Y-%m-%d %H:%M"))
  with open(out / "results.jsonl", "a") as f:
    f.write(json.dumps(result) + "\n")
  print(f"{args.how}: {result['wall_s']:.0f} s wall")


if __name__ == "__main__":
  main()
