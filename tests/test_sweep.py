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


@pytest.mark.parametrize("sweep, extra", [
    # outside the optimizer (hparams.py): the task's label smoothing; the optimizer's: a group's LR multiplier
    ("{task.label_smoothing: [0.0, 0.2], optim.groups.0.lr_mult: [1, 5]}",
     ('optim.groups=[{match: "classifier/.*", lr_mult: 2}]',)),
    # LoRA's scale (train, and the merged eval) and its dropout
    ("{lora.alpha: [4, 32], lora.dropout: [0.0, 0.2]}", ("lora.preset=qv", "lora.rank=4", "optim.lr=1e-2")),
])
def test_keys_outside_the_optimizer_and_a_groups_lr_mult_sweep_as_single_runs(tiny_cfg, sweep, extra):
  """Each replica's train losses, and its validation metrics (LoRA's scale acts in the merged eval too), are its
  single run's with those values."""
  from jaxft.evaluate import evaluate
  from jaxft.experiment import setup
  extra = ("train.epochs=2", "freeze_embeddings=true") + extra
  exp = build(tiny_cfg(*extra, f"train.sweep={sweep}"), **QUIET)
  grid = replicas.grid(exp.cfg)
  assert len(grid) == 4
  step, state, steps = jax.jit(exp.train_step(0)), exp.initial_state(), 10
  feed = replicas.Batches([exp.train_batches(seed=s) for _, s in grid])
  losses = []
  for i in range(steps):
    state, m = step(state, feed[i])
    losses.append(np.asarray(m["loss"]))
  losses = np.stack(losses)
  par, targets = setup(exp, **QUIET)
  val = evaluate(exp, par, par.compile_eval(exp.eval_step(), targets[0]), state.params, state.model_state,
                 "validation")["loss_seeds"]
  for k, (setting, _) in enumerate(grid):
    values = [f"{key}={value}" for key, value in setting.items()]
    single_cfg = tiny_cfg(*extra, *values)
    np.testing.assert_allclose(losses[:, k], single_losses(single_cfg, steps), atol=2e-5, err_msg=str(setting))
    one = build(single_cfg, **QUIET)
    one_step, one_state, batches = jax.jit(one.train_step(0)), one.initial_state(), one.train_batches()
    for i in range(steps):
      one_state = one_step(one_state, batches[i])[0]
    one_par, one_targets = setup(one, **QUIET)
    single_val = evaluate(one, one_par, one_par.compile_eval(one.eval_step(), one_targets[0]), one_state.params,
                          one_state.model_state, "validation")["loss"]
    np.testing.assert_allclose(val[k], single_val, atol=2e-5, err_msg=str(setting))
  assert np.abs(losses[:, 0] - losses[:, 2]).max() > 1e-4 and np.abs(losses[:, 0] - losses[:, 1]).max() > 1e-4


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
    ("train.sweep={lora.alpha: [8, 16]}", r"lora.alpha cannot differ .* sweepable here: optim.lr, "),  # no LoRA
    ("train.sweep={optim.groups.0.lr_mult: [1, 2]}", r"optim.groups.0.lr_mult cannot differ"),  # no such group
    ("train.sweep={task.label_smoothing: [0.0, 1.0]}", r"'train.sweep.task.label_smoothing': every value must be "
                                                        r"in \[0, 1\)"),
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
