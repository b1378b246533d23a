"""End-to-end runs on the tiny checkpoint: outputs, exact resume, and refusing a bad resume."""
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxft.checkpoint import Checkpointer
from jaxft.errors import JaxftError
from jaxft.experiment import build
from jaxft.train import train


def final_params(run_dir, like_state):
  ckpt = Checkpointer(run_dir / "checkpoints", 10)
  state = ckpt.restore(ckpt.latest_step(), like_state)[0]
  ckpt.close()
  return traverse_util.flatten_dict(jax.device_get(state.params), sep="/")


def test_train_learns_and_writes_run_dir(tiny_cfg, capsys):
  cfg = tiny_cfg("train.epochs=3", "train.eval_every=16", "train.checkpoint_every=8")
  test = train(cfg)
  run = cfg.run_dir
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == f"test loss {test['loss']:.4f}  accuracy {test['accuracy']:.4f}  macro_f1 {test['macro_f1']:.4f}"
  assert test["accuracy"] > 0.8  # the task is one keyword per example: a working step learns it
  rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
  assert {r["split"] for r in rows} == {"train", "validation", "test"}
  assert all(np.isfinite(r["loss"]) and r["examples_per_s"] > 0 for r in rows if r["split"] == "train")
  assert os.listdir(f"{run}/tensorboard")
  assert "freeze_bottom_layers: 0" in open(f"{run}/config.yaml").read()
  # last 2 checkpoints (keep=2) plus the best by validation accuracy
  steps = sorted(int(p.name) for p in Path(run, "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-2:] == [40, 48] and 2 <= len(steps) <= 3


def test_resume_is_bitwise_exact(tiny_cfg, capsys):
  """N steps, stop, resume N steps == 2N uninterrupted steps (params bitwise, same data order), resumed from
  step N (a silent restart from 0 would end equal too)."""
  cfg = tiny_cfg("train.epochs=2", "train.eval_every=100", "train.checkpoint_every=16", "train.keep=5")
  train(cfg)  # 32 steps, checkpoints at 16 and 32
  like = build(cfg, print).initial_state()
  ckpt_dir = Path(cfg.run_dir) / "checkpoints"
  uninterrupted = final_params(ckpt_dir.parent, like)
  rows_before = metric_rows(cfg.run_dir)
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["16", "32"]
  shutil.rmtree(ckpt_dir / "32")  # as if killed right after step 16's checkpoint
  capsys.readouterr()
  train(cfg)
  assert f"resumingfrom{ckpt_dir.absolute()}/16inphasetrain" in "".join(capsys.readouterr().err.split())  # (wrapped)
  resumed = final_params(ckpt_dir.parent, like)
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["16", "32"]
  for path in uninterrupted:
    np.testing.assert_array_equal(resumed[path], uninterrupted[path], err_msg=path)
  # metrics.jsonl reads like one run: the rows past step 16 (and the test row) were replaced, not repeated
  assert metric_rows(cfg.run_dir) == rows_before


def metric_rows(run_dir):
  timing = {"time", "examples_per_s", "step_ms", "compiles"}
  return [{k: v for k, v in json.loads(l).items() if k not in timing} for l in open(Path(run_dir) / "metrics.jsonl")]


def test_unrestorable_checkpoint_stops_instead_of_restarting(tiny_cfg):
  cfg = tiny_cfg("train.epochs=0.5", "train.eval_every=100")
  train(cfg)
  ckpt_dir = Path(cfg.run_dir) / "checkpoints"
  before = sorted(p.name for p in ckpt_dir.iterdir())
  # A config saved before a key existed (train.min_steps here) reads it as its default: the same run resumes.
  saved = ckpt_dir.parent / "config.yaml"
  saved.write_text("".join(line for line in saved.read_text().splitlines(True) if "min_steps" not in line))
  train(tiny_cfg("train.epochs=0.5", "train.eval_every=100", "train.log_every=1"))  # (how it logs may change)
  # Same run dir, but SGD's state no longer matches the saved AdamW one.
  sgd = ("train.epochs=0.5", "train.eval_every=100", "optim.name=sgd")
  with pytest.raises(JaxftError, match=r"^run_dir .* holds a run with another config \(optim.name: 'adamw' -> 'sgd'\); "
                                       r"resuming would mix two experiments: give this one its own run_dir=\.\.\., or "
                                       r"pass --no-resume to discard that run$"):
    train(tiny_cfg(*sgd))
  (ckpt_dir.parent / "config.yaml").unlink()  # a run dir without its config: the checkpoints themselves refuse
  with pytest.raises(JaxftError, match=r"none of the 1 checkpoints in .* can be restored \(newest, 8: .*"
                                       r"change it back, or train in a new run_dir \(--no-resume would delete them\)"):
    train(tiny_cfg(*sgd))
  assert sorted(p.name for p in ckpt_dir.iterdir()) == before  # nothing saved was touched
  assert not (ckpt_dir.parent / "damaged").exists()  # nor moved aside: the config, not the files, changed
  # --no-resume starts over.
  test = train(tiny_cfg(*sgd, "resume=false"))
  assert np.isfinite(test["loss"])


def test_a_run_keeps_its_labels(tiny_cfg, tmp_path):
  """The class names are stored with the checkpoints (and an export): evaluating or resuming with the labels
  listed in another order maps them by name; a label set the head was not trained on is refused."""
  from jaxft.evaluate import evaluate_run
  from jaxft.export import export
  cfg = tiny_cfg("train.epochs=3", "train.checkpoint_every=24", "train.keep=5")
  test = train(cfg)
  assert test["accuracy"] > 0.8
  reordered = evaluate_run(tiny_cfg("task.label_names=[pos, neg]"), "test")
  assert reordered == test  # not 1 - accuracy: the head's outputs keep their names
  shutil.rmtree(Path(cfg.run_dir) / "checkpoints" / "48")
  resumed = train(tiny_cfg("train.epochs=3", "train.checkpoint_every=24", "train.keep=5", "task.label_names=[pos, neg]"))
  assert resumed == test  # resumed from step 24 with the run's order: the same run
  with pytest.raises(JaxftError, match=r"the labels \['neg', 'pos', 'neutral'\] include \['neutral'\], which the run "
                                       r"in .* \(checkpoint 48\) was not trained on \(its labels: \['neg', 'pos'\]\): "
                                       "the label set changed"):
    train(tiny_cfg("train.epochs=3", "task.label_names=[neg, pos, neutral]"))
  out = export(cfg, tmp_path / "exported")
  assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
  from_export = tiny_cfg(f"model.name={out}", "task.label_names=[pos, neg]", f"run_dir={tmp_path / 'fresh'}")
  assert evaluate_run(from_export, "test") == test


def test_one_run_per_directory(tiny_cfg):
  """A live holder of the run dir's lock makes a second run refuse (touching nothing); once the holder is killed,
  the lock it left is taken over."""
  import subprocess
  import sys
  cfg = tiny_cfg("train.epochs=0.5")
  lock = Path(cfg.run_dir) / ".lock"
  lock.parent.mkdir(parents=True)
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jaxft import run_lock; "
                             "lock = run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)", cfg.run_dir],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(JaxftError, match=rf"run_dir .* is in use by process {holder.pid} on "):
      train(cfg)
    assert not (Path(cfg.run_dir) / "checkpoints").exists() and lock.exists()
  finally:
    holder.kill()  # SIGKILL: it leaves its .lock behind
    holder.wait()
  assert json.loads(lock.read_text())["pid"] == holder.pid
  train(cfg)  # the holder is gone: the OS released its lock
  assert not lock.exists() and (Path(cfg.run_dir) / "checkpoints").exists()
