"""Does a refactor keep results bit-identical? Runs shipped configs on this tree and on a reference commit
(a git worktree), then compares every metrics.jsonl row (train losses, validation and test metrics), all but
the timing fields, and the printed test line.

  python benchmarks/same_results.py REF [--configs default,ner_wnut16,...] [--root DIR] [--ref-only]

Each config runs as it ships, plus the overrides in RUNS (a data.limit where the full run takes long on 2 cores).
Runs whose metrics.jsonl already exists under --root are reused (the reference's, from an earlier call).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMING = {"time", "step_ms", "examples_per_s", "tokens_per_s", "compiles", "data_wait_ms"}
RUNS = {  # config -> overrides: one run of each task's shipped config
    "default": [],
    "lp_ft": [],
    "ner_wnut16": ["train.epochs=1"],
    "qa_generated": [],
    "vision_fashion_mnist": [],  # as shipped (a data.limit would now train train.min_steps: 1,250 steps anyway)
    "lm_austen": [],
    # (generating for every one of the 40: the key that caps it moved, generate.* -> task.*, in issue 31)
    "sft_sentiment": ["data.limit={train: 160, validation: 40, test: 40}"],
}


def run(tree: Path, config: str, overrides: list, run_dir: Path) -> str:
  if (run_dir / "metrics.jsonl").exists() and (run_dir / "stdout.txt").exists():
    return (run_dir / "stdout.txt").read_text()
  args = [] if config == "default" else [str(tree / "configs" / f"{config}.yaml")]
  env = {**os.environ, "PYTHONPATH": str(tree)}
  cmd = [sys.executable, "-m", "jaxft.cli", "train", *args, *overrides, f"run_dir={run_dir}", "resume=false"]
  t = time.time()
  out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
  if out.returncode != 0:
    raise SystemExit(f"{tree.name} {config}: exit {out.returncode}\n{out.stderr[-3000:]}")
  (run_dir / "stdout.txt").write_text(out.stdout)
  print(f"  {tree.name} {config}: {time.time() - t:.0f}s  {out.stdout.strip()}", flush=True)
  return out.stdout


def rows(run_dir: Path) -> list[dict]:
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("ref", help="the reference commit")
  p.add_argument("--configs", default=",".join(RUNS))
  p.add_argument("--root", default="/tmp/jaxft_same_results")
  p.add_argument("--ref-only", action="store_true", help="only the reference's runs (while this tree is edited)")
  a = p.parse_args()
  root = Path(a.root)
  ref_tree = root / f"ref-{a.ref}"
  if not ref_tree.exists():
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(ref_tree), a.ref], check=True,
                   capture_output=True)
  head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  failed = []
  for config in a.configs.split(","):
    outs = {}
    for name, tree in (("ref", ref_tree),) if a.ref_only else (("ref", ref_tree), ("new", REPO)):
      run_dir = root / ("ref-" + a.ref if name == "ref" else "new") / config
      run_dir.mkdir(parents=True, exist_ok=True)
      outs[name] = (run(tree, config, RUNS[config], run_dir), rows(run_dir))
    if a.ref_only:
      continue
    same = outs["ref"][1] == outs["new"][1] and outs["ref"][0].split("\n")[-2:] == outs["new"][0].split("\n")[-2:]
    n = len(outs["new"][1])
    print(f"{config}: {'identical' if same else 'DIFFERENT'} ({n} rows; {a.ref} vs {head} + worktree changes)")
    failed += [] if same else [config]
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
