"""train.sweep_prune: successive halving drops the settings whose seeds rank worst on validation, training goes
on with the replicas left exactly as it would have, and a run stopped after a prune resumes exactly."""
import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import metric_rows as rows
from conftest import stopped_then_resumed

from jaxft import pruning
from jaxft.checkpoint import Checkpointer
from jaxft.config import load_config
from jaxft.errors import JaxftError

LRS = [1e-5, 3e-3, 2e-5, 1e-3]  # two that learn within the run, two that barely move
RUN = ("train.epochs=2", "train.eval_every=4", "train.checkpoint_every=4", "train.keep=1", "train.log_every=1",
       "freeze_embeddings=true", f"train.sweep={{optim.lr: {LRS}}}", "train.seeds=[0, 3]")
PRUNE = "train.sweep_prune={at: [0.5], keep: 0.5}"


def test_survivors_keep_the_best_settings_with_all_their_seeds():
  settings = [{"lr": x} for x in (1, 1, 2, 2, 3, 3)]
  best = [0.5, 0.7, 0.9, 0.8, 0.6, 0.6]  # means 0.6, 0.85, 0.6: the tie keeps the setting listed first
  assert pruning.survivors(settings, list(range(6)), best, 0.5, False) == [0, 1, 2, 3]
  assert pruning.survivors(settings, list(range(6)), best, 0.3, False) == [2, 3]
  assert pruning.survivors(settings, list(range(6)), best, 0.3, True) == [0, 1]  # a loss: lower is better
  assert pruning.survivors(settings, [0, 1, 4, 5], [0.9, 0.9, None, None, 0.1, 0.2], 0.5, True) == [4, 5]
  assert pruning.survivors(settings, [0, 1, 4, 5], [None, 0.9, 0, 0, 0.1, 0.2], 0.5, False) == [4, 5]  # none: last


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_data, tmp_path_factory):
  """Run dirs of a 4-setting x 2-seed sweep: whole, pruned at half its steps, and pruned but stopped by SIGTERM
  two steps after the prune and resumed; the pruned run's printed lines."""
  from conftest import tiny_overrides

  from jaxft.train import train
  root = tmp_path_factory.mktemp("pruning")
  cfg = lambda name, *extra: load_config(None, tiny_overrides(tiny_bert, tiny_data, root / name) + RUN + extra)  # noqa: E731
  train(cfg("whole"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    train(cfg("pruned", PRUNE))
  at = min(pruning.steps(cfg("x", PRUNE), max(r["step"] for r in rows(root / "whole", "train"))))
  stopped_then_resumed(cfg("resumed", PRUNE), at + 2)
  return {"at": at, "printed": printed.getvalue(), "cfg": cfg("pruned", PRUNE),
          **{n: root / n for n in ("whole", "pruned", "resumed")}}


def record_of(run_dir):
  ckpt = Checkpointer(Path(run_dir) / "checkpoints", 1)
  return ckpt.record(ckpt.latest_step())


def test_pruning_drops_the_worst_settings_and_the_rest_train_as_they_would_have(runs):
  at, whole = runs["at"], rows(runs["whole"], "validation")
  best = np.max([r["accuracy_seeds"] for r in whole if r["step"] <= at], axis=0)  # each replica's best by `at`
  means = {lr: best[2 * i:2 * i + 2].mean() for i, lr in enumerate(LRS)}
  worst = sorted(LRS, key=means.get)[:2]
  assert max(means[lr] for lr in worst) < min(means[lr] for lr in LRS if lr not in worst), means  # no tie decides
  pruned = record_of(runs["pruned"]).pruned
  dropped = [r for r, step in enumerate(pruned) if step is not None]
  assert dropped == sorted(2 * LRS.index(lr) + s for lr in worst for s in (0, 1))
  assert {pruned[r] for r in dropped} == {at}
  kept = [r for r in range(8) if r not in dropped]
  train_whole, train_pruned = rows(runs["whole"], "train"), rows(runs["pruned"], "train")
  assert [r["step"] for r in train_whole] == [r["step"] for r in train_pruned]
  np.testing.assert_allclose([[r["loss_seeds"][k] for k in kept] for r in train_pruned],
                             [[r["loss_seeds"][k] for k in kept] for r in train_whole], atol=1e-6)
  assert all(math.isnan(r["loss_seeds"][k]) for r in train_pruned if r["step"] > at for k in dropped)
  test_whole, test_pruned = rows(runs["whole"], "test")[0], rows(runs["pruned"], "test")[0]
  np.testing.assert_allclose([test_pruned["accuracy_seeds"][k] for k in kept],
                             [test_whole["accuracy_seeds"][k] for k in kept], atol=1e-6)
  assert all(math.isnan(test_pruned["accuracy_seeds"][k]) for k in dropped)
  table = runs["printed"][runs["printed"].index("setting"):].strip().splitlines()
  assert len(table) == 6 and all(f"dropped at step {at}" in line for line in table[3:5]), table
  assert table[0].startswith("setting") and table[-1].startswith("winner by validation accuracy: optim.lr=")


def test_a_pruned_run_stopped_after_the_prune_resumes_exactly(runs):
  for split in ("train", "validation", "test"):
    a, b = rows(runs["pruned"], split), rows(runs["resumed"], split)
    assert [r["step"] for r in a] == [r["step"] for r in b], split
    key = "loss_seeds" if split == "train" else "accuracy_seeds"
    np.testing.assert_array_equal([r[key] for r in a], [r[key] for r in b], err_msg=split)
  assert record_of(runs["pruned"]).pruned == record_of(runs["resumed"]).pruned


@pytest.mark.parametrize("bad, msg", [
    ("train.sweep_prune={at: [0.5], keep: 0.5}", r"'train.sweep_prune' needs train.sweep"),
    ("train.sweep={optim.lr: [1e-3, 3e-4]} train.sweep_prune={at: [0.5, 0.25], keep: 0.5}",
     r"'train.sweep_prune' must be \{at: \[increasing fractions"),
    ("train.sweep={optim.lr: [1e-3, 3e-4]} train.sweep_prune={at: [0.5], keep: 1}", r"keep: a fraction in \(0, 1\)"),
])
def test_a_bad_sweep_prune_is_a_one_line_error(bad, msg):
  with pytest.raises(JaxftError, match=msg):
    load_config(None, tuple(bad.split(" train.")[:1]) + tuple("train." + x for x in bad.split(" train.")[1:]))


def test_soup_and_interpolate_read_a_pruned_sweep(runs, tmp_path):
  """jaxft soup and jaxft interpolate on a pruned sweep: every replica at its best (a dropped one's from before
  its drop); the soup's written model loads."""
  from jaxft.ensembles import interpolate, soup
  quiet = lambda *a, **k: None  # noqa: E731
  rows = soup(runs["cfg"], tmp_path / "soup", quiet)
  members = [r for r in rows if r["soup"].startswith("replica ")]
  assert len(members) == 8 and all(0 <= r["test/accuracy"] <= 1 for r in members)
  assert (tmp_path / "soup" / "config.json").is_file()
  curve = interpolate(runs["cfg"], [0.0, 1.0], quiet)
  assert {r["alpha"] for r in curve} == {0.0, 1.0}
