"""Sweeps in one compiled step (train.sweep): replica k holds its own hyperparameters in its optimizer state and
computes what the single run with those values and its seed computes."""
import jax
import numpy as np
import pytest
from test_replicas import single_losses

from jaxft import optim, replicas
from jaxft.config import load_config
from jaxft.errors import JaxftError
from jaxft.experiment import build

QUIET = dict(log=lambda *_: None)


def test_replica_k_equals_the_single_run_with_its_values_and_seed(tiny_cfg):
  """2 learning rates x 2 warmups x 2 seeds: 8 replicas of one step, each equal to its single run (weight decay
  and warmup shape the schedule and the update inside the step, from the replica's own state)."""
  sweep = "train.sweep={optim.lr: [1e-3, 3e-4], optim.warmup_ratio: [0.0, 0.3]}"
  extra = ("train.epochs=2", "freeze_embeddings=true", "optim.weight_decay=0.01", "optim.schedule=cosine")
  exp = build(tiny_cfg(*extra, sweep, "train.seeds=[0, 3]"), **QUIET)
  grid = replicas.grid(exp.cfg)
  assert len(grid) == 8 and grid[0] == ({"optim.lr": 1e-3, "optim.warmup_ratio": 0.0}, 0)
  assert grid[3] == ({"optim.lr": 1e-3, "optim.warmup_ratio": 0.3}, 3)
  step, state, steps = jax.jit(exp.train_step(0)), exp.initial_state(), 12
  assert np.allclose(state.opt_state.hparams["lr"], [1e-3] * 4 + [3e-4] * 4)
  feed = replicas.Batches([exp.train_batches(seed=s) for _, s in grid])
  losses = []
  for i in range(steps):
    state, m = step(state, feed[i])
    losses.append(np.asarray(m["loss"]))
  losses = np.stack(losses)  # [steps, R]
  for k in (0, 3, 5, 6):  # every value of each key and each seed (replicas with seeds alone: test_replicas)
    setting, seed = grid[k]
    values = [f"{key}={value}" for key, value in setting.items()]
    np.testing.assert_allclose(losses[:, k], single_losses(tiny_cfg(*extra, *values, f"seed={seed}"), steps),
                               atol=1e-5, err_msg=f"replica {k} ({setting}, seed {seed})")
  assert np.abs(losses[:, 0] - losses[:, 4]).max() > 1e-3  # the learning rates differ
  assert np.abs(losses[:, 0] - losses[:, 2]).max() > 1e-4  # so do the warmups


def test_weight_decay_swept_reaches_only_the_leaves_that_take_it():
  """Biases and norm scales keep no decay when optim.weight_decay is swept (their groups are their own)."""
  import jax.numpy as jnp
  from flax import traverse_util
  conv = type("C", (), {"no_decay": (r".*bias", r".*scale"), "embeddings": None, "layers": None})()
  cfg = load_config(None, ("train.sweep={optim.weight_decay: [0.0, 0.5]}", "optim.lr=0.1", "optim.schedule=constant",
                                  "optim.warmup_ratio=0"))
  params = traverse_util.unflatten_dict({("w",): jnp.ones(3), ("bias",): jnp.ones(3)})
  labels = {"w": "train", "bias": "train"}
  tx, _ = optim.make_optimizer(cfg.optim, params, labels, 10, 32, conv, ("weight_decay",))
  zero = jax.tree.map(jnp.zeros_like, params)
  for wd in (0.0, 0.5):
    state = optim.with_hparams(tx.init(params), {"weight_decay": wd})
    updates, _ = tx.update(zero, state, params)
    assert np.allclose(updates["w"], -0.1 * wd) and np.allclose(updates["bias"], 0.0), (wd, updates)


@pytest.mark.parametrize("bad,msg", [
    ("train.sweep={train.batch_size: [8, 16]}", r"train.batch_size cannot differ between the replicas"),
    ("train.sweep={optim.lr: [1e-3, 1e-3]}", r"'train.sweep.optim.lr' must be a list of distinct numbers"),
    ("train.sweep={optim.lr: 1e-3}", r"'train.sweep.optim.lr' must be a list"),
    ("train.sweep=[1, 2]", r"'train.sweep' expects dict"),
])
def test_a_bad_sweep_is_a_one_line_error(bad, msg):
  with pytest.raises(JaxftError, match=msg):
    load_config(None, (bad,))


def test_a_sweep_run_prints_each_setting_and_the_winner(tiny_bert, tiny_data, tmp_path):
  """jaxft train with train.sweep: one line per setting (mean ± CI over its seeds), best first, and the winner as
  overrides; the validation metrics of every replica are in metrics.jsonl; jaxft plot draws sweep.png."""
  import json
  import re

  from conftest import jaxft, tiny_overrides
  overrides = tiny_overrides(tiny_bert, tiny_data, tmp_path / "run", "pt", "train.epochs=2")
  r = jaxft("train", *overrides, "train.sweep={optim.lr: [1e-5, 3e-3]}", "train.seeds=2")
  assert r.returncode == 0, r.stderr[-3000:]
  table = r.stdout[r.stdout.index("setting"):].splitlines()
  assert len(table) == 4 and table[1].startswith("optim.lr=0.003 ") and table[2].startswith("optim.lr=1e-05 "), table
  assert re.search(r"\(2 seeds\)$", table[1]) and table[3] == "winner by validation accuracy: optim.lr=0.003"
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(next(row for row in rows if row["split"] == "validation")["accuracy_seeds"]) == 4
  drawn = jaxft("plot", str(tmp_path / "run"))  # the metric against each swept key
  assert drawn.returncode == 0 and (tmp_path / "run" / "sweep.png").stat().st_size > 0, drawn.stderr[-2000:]
