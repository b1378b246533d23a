"""configs/vision_fashion_mnist.yaml at one budget, five ways: what fine-tuning EfficientNet-Lite0 is worth.

  python benchmarks/vision_variants.py [--only NAME ...] [--out DIR]

Each variant is `jaxft train` with the config and a few overrides, in its own run dir under --out
(default runs/vision_variants); prints one JSON line per variant (test metrics, wall time, median step
time from metrics.jsonl) and a Markdown table at the end.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/vision_fashion_mnist.yaml"
VARIANTS = {
    "linear probe (cached features)": ["train_only=[classifier/.*]", "train.cache_features=true", "optim.lr=1e-3"],
    "bottom 4 stages frozen (stem + blocks 0-7)": ["freeze_bottom_layers=8"],
    "full fine-tune": [],
    "LP-FT": ["phases_preset=lp_ft"],
    "random initialisation, full training": ["model.weights=random"],
}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", nargs="*", default=None)
  p.add_argument("--out", default="runs/vision_variants")
  args = p.parse_args()
  rows = []
  for i, (name, overrides) in enumerate(VARIANTS.items()):
    if args.only and str(i) not in args.only and name not in args.only:
      continue
    run_dir = Path(args.out) / f"v{i}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", CONFIG, f"run_dir={run_dir}", "resume=false",
                           *overrides], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
      raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    metrics = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    test = next(m for m in metrics if m["split"] == "test")
    steps = [m["step_ms"] for m in metrics if m["split"] == "train" and "step_ms" in m][1:]
    row = {"variant": name, "overrides": " ".join(overrides), "test_accuracy": test["accuracy"],
           "test_top5": test["top5_accuracy"], "test_macro_f1": test["macro_f1"], "wall_s": wall,
           "step_ms_median": sorted(steps)[len(steps) // 2] if steps else None, "steps": test["step"]}
    print(json.dumps(row), flush=True)
    rows.append(row)
  print("\n| variant | overrides | test accuracy | top-5 | macro-F1 | steps | wall |\n|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | `{r['overrides'] or '(none)'}` | {r['test_accuracy']:.4f} | {r['test_top5']:.4f} | "
          f"{r['test_macro_f1']:.4f} | {r['steps']} | {r['wall_s'] / 60:.1f} min |")


if __name__ == "__main__":
  main()
