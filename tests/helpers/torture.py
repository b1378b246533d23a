"""Seeded fault torture (issue 12): a tiny run is killed (SIGKILL) or stopped (SIGTERM, SIGINT) at N random
points, after a step or in the middle of writing a checkpoint, and each time rerun with the same command. Its
final params must equal an uninterrupted run's bit for bit.

  python tests/helpers/torture.py [--points 10] [--seed 0] [--workdir DIR]

tests/test_faults.py runs it (marked slow); it writes the tiny checkpoint and data it trains on.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: conftest
from conftest import jaxft, make_tiny_bert, make_tiny_data, tiny_overrides  # noqa: E402

RUN = ("train.epochs=3", "train.checkpoint_every=5", "train.eval_every=16")  # 48 steps, saves every 5
STEPS, SAVE_EVERY = 48, 5
EXIT = {"KILL": -9, "TERM": 75, "INT": 130}
KINDS = [("step", "KILL"), ("save", "KILL"), ("step", "TERM"), ("save", "TERM"), ("step", "INT")]


def params_at(run_dir: Path, step: int) -> dict:
  """{path: array} of the params in checkpoint `step`, read as saved (no model needed)."""
  import jax
  import orbax.checkpoint as ocp
  state = ocp.PyTreeCheckpointer().restore(Path(run_dir) / "checkpoints" / str(step) / "state")
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}


def resumed_from(stderr: str) -> int | None:
  """The step a run resumed from, as it logged it (None: it started fresh)."""
  marker = "resuming from "
  if marker not in stderr:
    return None
  return int(stderr.split(marker)[1].split()[0].rstrip("/").rsplit("/", 1)[1])


def newest_checkpoint(run_dir: Path) -> int | None:
  """The newest committed checkpoint's step (a save cut short leaves only a *.orbax-checkpoint-tmp* directory)."""
  ckpts = Path(run_dir) / "checkpoints"
  steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
  return max(steps, default=None)


def faults(points: int, seed: int) -> list[str]:
  """`points` fault specs at increasing steps, so that each one fires in the run after the previous."""
  rng = np.random.default_rng(seed)
  steps = sorted(int(s) for s in rng.choice(np.arange(1, STEPS), points, replace=False)) + [STEPS]
  out = []
  for step, following in zip(steps, steps[1:]):
    when, sig = KINDS[rng.integers(len(KINDS))]
    save = -(-step // SAVE_EVERY) * SAVE_EVERY  # the first save at or after `step`
    when, step = ("save", save) if when == "save" and save < following else ("step", step)
    out.append(f"{when}:{step}:{sig}")
  return out


def torture(workdir: Path, points: int = 10, seed: int = 0) -> list[dict]:
  """Runs the reference and the tortured run; returns one row per run. Raises AssertionError on a mismatch."""
  for d in ("model", "data"):
    (workdir / d).mkdir(parents=True)
  model, data = make_tiny_bert(workdir / "model"), make_tiny_data(workdir / "data")
  ref = jaxft("train", *tiny_overrides(model, data, workdir / "reference"), *RUN)
  assert ref.returncode == 0, ref.stderr[-3000:]
  rows, overrides = [], (*tiny_overrides(model, data, workdir / "tortured"), *RUN)
  for fault in faults(points, seed) + [None]:
    committed = newest_checkpoint(workdir / "tortured")
    r = jaxft("train", *overrides, fault=fault)
    expected = EXIT[fault.split(":")[2]] if fault else 0
    rows.append({"fault": fault or "none", "exit": r.returncode, "resumed_from": resumed_from(r.stderr)})
    assert r.returncode == expected, (fault, r.returncode, r.stderr[-3000:])
    # a silent restart from step 0 would end bitwise equal too: each run resumes from the newest committed save
    assert rows[-1]["resumed_from"] == committed, (fault, committed, r.stderr[-3000:])
  want, got = params_at(workdir / "reference", STEPS), params_at(workdir / "tortured", STEPS)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)
  rows.append({"fault": "final params", "bitwise_equal_leaves": len(want)})
  return rows


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--points", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", type=Path)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or Path(tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    for row in torture(workdir, args.points, args.seed):
      print(json.dumps(row), flush=True)
