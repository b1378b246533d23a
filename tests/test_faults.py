"""Faults injected into real `jaxft train` processes (issue 12): preemption signals at a step and mid-save,
damaged checkpoints, a full disk, an unwritable checkpoint dir, two runs on one directory, two hosts that
must agree on the step to save. Every subprocess has a timeout: a hang fails the test."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import jaxft, tiny_overrides
from torture import RUN, STEPS, params_at, resumed_from, torture

from jaxft.checkpoint import Checkpointer
from jaxft.errors import JaxftError
from jaxft.experiment import build
from jaxft.train import train


def steps(run_dir) -> list[int]:
  return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


def damage(step_dir: Path) -> None:
  """Cuts every array file of a checkpoint short, as a crash of the file system would."""
  for f in (step_dir / "state").rglob("d/*"):
    os.truncate(f, 100)


def assert_same_params(run_dir, reference):
  got = params_at(run_dir, STEPS)
  for path, want in reference.items():
    np.testing.assert_array_equal(got[path], want, err_msg=path)


@pytest.fixture(scope="module")
def ref(tiny_bert, tiny_data, tmp_path_factory):
  """(name -> (a fresh run dir, the run's overrides), the final params of an uninterrupted run)."""
  root = tmp_path_factory.mktemp("faults")

  def overrides(name):  # checkpoints every 5 steps; validation only at the end (the best is the last)
    return root / name, (*tiny_overrides(tiny_bert, tiny_data, root / name), *RUN, "train.eval_every=100")
  r = jaxft("train", *overrides("reference")[1])
  assert r.returncode == 0, r.stderr[-3000:]
  return overrides, params_at(root / "reference", STEPS)


@pytest.mark.parametrize("sig,code", [("TERM", 75), ("INT", 130)])
def test_signal_saves_the_step_in_flight_and_resumes_exactly(ref, sig, code):
  overrides, reference = ref
  run_dir, run = overrides(f"sig{sig}")
  r = jaxft("train", *run, fault=f"step:22:{sig}")
  assert r.returncode == code, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (f"stopped by SIG{sig} after step 22: checkpoint {run_dir}/checkpoints/"
                                               f"22 committed; run the same command to resume (exit {code})")
  assert steps(run_dir) == [20, 22] and not (run_dir / ".lock").exists()
  r = jaxft("train", *run)
  assert r.returncode == 0 and resumed_from(r.stderr) == 22, r.stderr[-3000:]
  assert_same_params(run_dir, reference)


def test_signal_in_the_test_pass_cuts_it_and_the_rerun_tests(ref):
  """Training is done and checkpointed: a signal stops the test pass (it says so) instead of running it all; the
  rerun trains no more and reports the uninterrupted run's test metrics."""
  overrides, _ = ref
  run_dir, run = overrides("test_pass")
  r = jaxft("train", *run, fault=f"test:{STEPS}:TERM")
  assert r.returncode == 75 and "SIGTERM: stopping the test pass (training is done" in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1].startswith(f"stopped by SIGTERM after step {STEPS}: checkpoint {run_dir}/")
  assert r.stdout == "" and not final_test_rows(run_dir)
  r = jaxft("train", *run)
  assert r.returncode == 0 and resumed_from(r.stderr) == STEPS, r.stderr[-3000:]
  assert final_test_rows(run_dir) == final_test_rows(overrides("reference")[0]) and r.stdout.startswith("test loss ")


def final_test_rows(run_dir):
  rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in row.items() if k != "time"} for row in rows if row["split"] == "test"]


def test_second_signal_mid_save_exits_at_once_keeping_earlier_checkpoints(ref):
  overrides, reference = ref
  run_dir, run = overrides("twice")
  r = jaxft("train", *run, fault="step:22:INT,save:22:INT", timeout=120)
  assert r.returncode == 130 and "SIGINT again: exiting now, without saving" in r.stderr, r.stderr[-3000:]
  assert steps(run_dir) == [15, 20]  # 22 was cut short; the committed ones are intact
  r = jaxft("train", *run)
  assert r.returncode == 0 and resumed_from(r.stderr) == 20, r.stderr[-3000:]
  assert not list((run_dir / "checkpoints").glob("*tmp*"))  # the cut-short save was cleaned up
  assert_same_params(run_dir, reference)


def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(ref):
  overrides, reference = ref
  run_dir, run = overrides("damaged")
  assert jaxft("train", *run, fault="step:37:TERM").returncode == 75
  assert steps(run_dir) == [35, 37]
  damage(run_dir / "checkpoints" / "37")
  r = jaxft("train", *run)
  assert r.returncode == 0 and resumed_from(r.stderr) == 35, r.stderr[-3000:]
  flat = " ".join(r.stderr.split())
  assert "warning: checkpoint 37 is damaged (" in flat and f"moved it to {run_dir}/damaged/37 and resumed from " \
      "checkpoint 35" in flat, flat[-3000:]
  assert (run_dir / "damaged" / "37" / "state").is_dir()
  assert_same_params(run_dir, reference)


def test_damaged_best_checkpoint_is_found_when_the_run_resumes(ref):
  overrides, _ = ref
  run_dir, run = overrides("best")
  run = (*run, "train.eval_every=5", "train.best_metric=loss")
  assert jaxft("train", *run, fault="step:37:TERM").returncode == 75
  record = json.loads((run_dir / "checkpoints" / "37" / "meta" / "metadata").read_text())
  best = record["best_step"]
  assert best in steps(run_dir) and best != 37
  damage(run_dir / "checkpoints" / str(best))
  r = jaxft("train", *run)
  flat = " ".join(r.stderr.split())
  assert r.returncode == 0 and resumed_from(r.stderr) == 37, flat[-3000:]
  warning = f"warning: the best checkpoint so far, {best}, cannot be restored ("
  assert warning in flat and flat.index(warning) < flat.index("phase train:"), flat[-3000:]  # before training
  assert (run_dir / "damaged" / str(best)).is_dir()
  assert r.stdout.startswith("test loss ")


def _full_disk():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_full_disk_is_a_clear_error_and_earlier_checkpoints_stay(ref):
  overrides, _ = ref
  run_dir, run = overrides("full")
  assert jaxft("train", *run, fault="step:12:TERM").returncode == 75
  t0 = time.monotonic()
  r = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", *run], capture_output=True, text=True,
                     timeout=120, preexec_fn=_full_disk)
  errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]  # orbax's threads log to orbax.log
  assert r.returncode == 2 and errors == [f"error: cannot write checkpoint {run_dir}/checkpoints/15 (File too large "
                                          "(errno 27)); the earlier checkpoints are intact (steps: 10, 12); free disk "
                                          "space or fix the directory's permissions, then run the same command to "
                                          "resume"], r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "absl" not in r.stderr, r.stderr[-3000:]
  assert "File too large" in (run_dir / "orbax.log").read_text()  # orbax's own reports, for whoever digs deeper
  assert time.monotonic() - t0 < 60
  assert steps(run_dir) == [10, 12]
  r = jaxft("train", *run)  # space is back
  assert r.returncode == 0 and resumed_from(r.stderr) == 12, r.stderr[-3000:]


def test_unwritable_checkpoint_dir_fails_before_training(ref):
  overrides, _ = ref
  run_dir, run = overrides("unwritable")
  run_dir.mkdir()
  (run_dir / "checkpoints").write_text("a file where the checkpoints go")
  r = jaxft("train", *run, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
      f"error: cannot write checkpoints to {run_dir}/checkpoints: File exists"
  assert not (run_dir / "metrics.jsonl").exists()


def test_sigterm_from_outside_and_a_second_run_on_the_same_dir(ref):
  """A real SIGTERM from another process (a scheduler's); meanwhile a second run on the dir refuses."""
  overrides, _ = ref
  run_dir, run = overrides("outside")
  run = (*run, "train.epochs=1000")
  first = subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", *run], stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
      assert time.monotonic() < deadline and first.poll() is None, "the first run never started training"
      time.sleep(0.2)
    second = jaxft("train", *run, timeout=120)
    assert second.returncode == 2 and f"is in use by process {first.pid} on " in second.stderr.splitlines()[-1]
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
  finally:
    first.kill()
  assert first.returncode == 75, err[-3000:]
  step = int(err.split("stopped by SIGTERM after step ")[1].split(":")[0])
  assert steps(run_dir)[-1] == step


def test_two_hosts_save_the_same_step(ref):
  """jax.distributed on 127.0.0.1: a SIGTERM to one process stops both after the same step."""
  overrides, _ = ref
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  run_dir, run = overrides("hosts")
  hosts = (f"parallel.coordinator=127.0.0.1:{port}", "parallel.num_processes=2")
  env = lambda fault: {**os.environ, "JAXFT_FAULT": fault}  # noqa: E731
  procs = [subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", *run, *hosts, f"parallel.process_id={i}"],
                            env=env("step:21:TERM" if i else ""), stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    errs = [p.communicate(timeout=180)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [75, 75], errs[0][-2000:] + errs[1][-2000:]
  saved = {int(e.split("stopped by SIGTERM after step ")[1].split(":")[0]) for e in errs}
  assert len(saved) == 1 and saved.pop() in steps(run_dir)


def test_nonfinite_loss_stops_the_run_naming_the_step(tiny_cfg):
  """optim.lr=1e6 drives the loss to nan / inf: the run stops with the step and the newest checkpoint, and
  no non-finite value ever reaches the params; with skip_step the run goes on without those updates."""
  cfg = tiny_cfg("optim.lr=1e6", "optim.warmup_ratio=0", "train.epochs=3", "train.checkpoint_every=1",
                 "train.keep=100", "train.eval_every=1000")
  with pytest.raises(JaxftError, match=r"step (\d+): the loss or gradient norm is not finite .* Newest checkpoint: "):
    train(cfg)
  like = build(cfg, print).initial_state()
  ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", 100)
  for step in ckpt.manager.all_steps():
    params = jax.device_get(ckpt.restore(step, like)[0].params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step
  ckpt.close()
  skip = tiny_cfg("optim.lr=1e6", "optim.warmup_ratio=0", "train.epochs=3", "train.on_nonfinite=skip_step",
                  "run_dir=" + cfg.run_dir + "_skip")
  train(skip)
  rows = [json.loads(l) for l in open(Path(skip.run_dir) / "metrics.jsonl") if '"train"' in l]
  assert rows[-1]["skipped_steps"] > 0


@pytest.mark.slow
def test_torture(tmp_path):
  """kill -9 / SIGTERM / SIGINT at 4 seeded points, each resumed: final params bitwise equal (the 10-point run
  of benchmarks/RESULTS.md is `python tests/helpers/torture.py`)."""
  rows = torture(tmp_path, points=4, seed=0)
  assert rows[-1]["bitwise_equal_leaves"] > 0
