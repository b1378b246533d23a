"""Phases: what trains in each, optimizer state carried across, plateau ends, presets, cached
features, and resuming in the middle of a phase."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft import phases, rules
from jaxft.checkpoint import Checkpointer
from jaxft.data import batching
from jaxft.errors import JaxftError
from jaxft.experiment import build
from jaxft.step import init_state, make_train_step
from jaxft.train import train

TWO_PHASES = "phases=[{name: probe, train_only: [classifier/.*], steps: 4}, " \
             "{name: tune, freeze_bottom_layers: 2, optim: {lr: 1e-3}, steps: 8}]"


def params_at(cfg, step):
  exp = build(cfg, print)
  ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", 20)
  k = ckpt.record(step).phase
  state = ckpt.restore(step, init_state(exp.initial_state().params, exp.phases[k].tx, 0))[0]
  ckpt.close()
  return rules.flat(jax.device_get(state.params))


def changed(a, b):
  return {p for p in a if not np.array_equal(a[p], b[p])}


def test_phases_switch_what_trains_and_resume_mid_phase(tiny_cfg):
  cfg = tiny_cfg(TWO_PHASES, "train.checkpoint_every=2", "train.keep=20")
  initial = rules.flat(jax.device_get(build(cfg, print).initial_state().params))
  train(cfg)
  at4, at12 = params_at(cfg, 4), params_at(cfg, 12)
  assert changed(initial, at4) == {"classifier/kernel", "classifier/bias"}
  moved = changed(at4, at12)
  assert all("layer/0/" not in p and "layer/1/" not in p for p in moved)
  assert any("layer/3/" in p for p in moved) and "classifier/kernel" in moved
  rows = [json.loads(line) for line in open(Path(cfg.run_dir) / "metrics.jsonl")]
  assert [r["phase"] for r in rows if r["split"] == "train"] == [0, 0, 1, 1, 1, 1]  # log_every=2

  ckpt_dir = Path(cfg.run_dir) / "checkpoints"
  for d in ckpt_dir.iterdir():  # as if killed two steps into the second phase
    if d.name.isdigit() and int(d.name) > 6:
      shutil.rmtree(d)
  train(cfg)
  resumed = params_at(cfg, 12)
  for p, x in at12.items():
    np.testing.assert_array_equal(resumed[p], x, err_msg=p)


def test_carry_over_keeps_moments_of_params_trainable_in_both(tiny_cfg):
  exp = build(tiny_cfg(TWO_PHASES), print)
  step = jax.jit(make_train_step(exp.apply, exp.task.loss, exp.tx, exp.labels))
  batch = batching.bucketed(exp.splits["train"], exp.task.collate, 16, 1, 0, [32])[0]
  state, _ = step(exp.initial_state(), batch)
  new = phases.carry_over(state, exp.phases[1].tx)

  def moments(s):  # (param, role) -> leaf, for per-param leaves
    out = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(s.opt_state)[0]:
      if (p := rules.owner(kp, rules.flat(s.params))):
        out[(p, "".join(str(k) for k in kp if not isinstance(k, jax.tree_util.DictKey)))] = x
    return out
  old_m, new_m = moments(state), moments(new)
  head = [k for k in new_m if k[0] == "classifier/kernel"]
  assert head and all(np.array_equal(new_m[k], old_m[k]) and np.abs(new_m[k]).max() > 0 for k in head)
  layer3 = [k for k in new_m if k[0].startswith("bert/encoder/layer/3/")]
  assert layer3 and all(np.abs(new_m[k]).max() == 0 for k in layer3)  # new in this phase: fresh


def test_plateau_ends_the_phase(tiny_cfg):
  # lr 0: the validation loss never improves after the first eval, so patience 2 ends it at step 6.
  cfg = tiny_cfg("phases=[{name: stuck, optim: {lr: 0}, train: {eval_every: 2}, "
                 "until: {metric: val_loss, patience: 2, max_epochs: 4}}, {name: tune, steps: 3}]")
  train(cfg)
  rows = [json.loads(line) for line in open(Path(cfg.run_dir) / "metrics.jsonl")]
  val_steps = [r["step"] for r in rows if r["split"] == "validation"]
  assert val_steps == [2, 4, 6, 9]
  assert max(r["step"] for r in rows if r["split"] == "train") == 9


def test_cached_features_train_the_head_like_the_frozen_backbone(tiny_cfg):
  """Head-only steps on cached features == head-only steps through the frozen backbone (no dropout)."""
  spec = "phases=[{name: probe, train_only: [classifier/.*], train: {dropout: false, cache_features: %s}, steps: 6}]"
  out = {}
  for cache in ("true", "false"):
    cfg = tiny_cfg(spec % cache, "train.log_every=1")
    cfg.run_dir = cfg.run_dir + cache
    train(cfg)
    out[cache] = [r["loss"] for r in map(json.loads, open(Path(cfg.run_dir) / "metrics.jsonl"))
                  if r["split"] == "train"]
  np.testing.assert_allclose(out["true"], out["false"], rtol=1e-5)


def test_cache_features_needs_head_only(tiny_cfg):
  with pytest.raises(JaxftError, match="trains the head only, but bert/.* is trainable too"):
    build(tiny_cfg("train.cache_features=true"), print)


def test_presets(tiny_cfg):
  lp_ft = build(tiny_cfg("phases_preset=lp_ft"), print).phases
  assert [p.name for p in lp_ft] == ["linear_probe", "fine_tune"]
  assert {p for p, l in rules.flat(lp_ft[0].labels).items() if l == "train"} == {"classifier/kernel",
                                                                                 "classifier/bias"}
  assert lp_ft[0].cfg.train.cache_features and lp_ft[0].until["metric"] == "val_loss"
  assert all(l == "train" for l in rules.flat(lp_ft[1].labels).values())  # tiny_cfg: embeddings train
  assert lp_ft[1].cfg.optim.lr == pytest.approx(3e-3 / 2)  # half the run's LR
  exp = build(tiny_cfg("phases_preset=gradual_unfreeze"), print)
  assert len(exp.phases) == 5  # 4 layers + the head alone
  for i, p in enumerate(exp.phases):
    layers = {n for q, l in rules.flat(p.labels).items() if l == "train"
              and (n := rules.layer_index(q, exp.conventions)) is not None}
    assert layers == set(range(4 - i, 4)), (i, layers)


def test_min_steps_makes_small_data_train_more_epochs(tiny_cfg):
  """train.min_steps: the epoch-counted phases train at least that many steps in all (256 examples, batch 16:
  16 an epoch), each lengthened alike; a phase counted in steps, or a run already longer, keeps its own."""
  steps = lambda *o: [p.max_steps for p in build(tiny_cfg(*o), print).phases]  # noqa: E731
  assert steps("train.epochs=1") == [16] and steps("train.epochs=1", "train.min_steps=40") == [40]
  assert steps("train.epochs=3", "train.min_steps=40") == [48]
  assert steps("train.min_steps=40", "phases=[{steps: 5}, {epochs: 1}]") == [5, 40]
  assert steps("train.min_steps=40", "phases=[{epochs: 1}, {epochs: 1}]") == [20, 20]  # in all, lengthened alike


def test_bad_phase_is_one_line_error(tiny_cfg):
  with pytest.raises(JaxftError, match=r"'phases\[1\].data' cannot change between phases"):
    tiny_cfg("phases=[{steps: 2}, {steps: 2, data: {max_length: 8}}]")
  with pytest.raises(JaxftError, match=r"phases\[0\]: config key 'optim.lr' expects float"):
    tiny_cfg("phases=[{steps: 2, optim: {lr: fast}}]")
