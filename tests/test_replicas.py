"""Seed-vectorised runs (replicas.py): replica k of an N-seed step equals the single run with seed k; shared
(never trained) params are held once; batches of unequal shapes stack with weight-0 padding."""
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import metric_rows as rows
from conftest import stopped_then_resumed

from jaxft import replicas, rules
from jaxft.checkpoint import Checkpointer
from jaxft.errors import JaxftError
from jaxft.experiment import build

QUIET = dict(log=lambda *_: None)


def single_losses(cfg, steps):
  exp = build(cfg, **QUIET)
  step, batches, state, out = jax.jit(exp.train_step(0)), exp.train_batches(), exp.initial_state(), []
  for i in range(steps):
    state, m = step(state, batches[i])
    out.append(float(m["loss"]))
  return out


@pytest.mark.parametrize("pack,chunk", [(True, "null"), (False, 2)])
def test_replica_k_equals_the_single_run_with_seed_k(tiny_cfg, pack, chunk):
  """20 steps, dropout on: packed rows (their counts differ between replicas) or length buckets; the replicas
  one at a time in a loop inside the step (the CPU default) or vmapped together (train.replica_chunk=2)."""
  seeds, steps = [0, 3], 20
  extra = (f"data.pack={str(pack).lower()}", "train.epochs=3", "freeze_embeddings=true")
  exp = build(tiny_cfg(*extra, f"train.seeds={seeds}", f"train.replica_chunk={chunk}"), **QUIET)
  step, state = jax.jit(exp.train_step(0)), exp.initial_state()
  feed = replicas.Batches([exp.train_batches(seed=s) for s in seeds])
  losses = []
  for i in range(steps):
    state, m = step(state, feed[i])
    losses.append(np.asarray(m["loss"]))
  losses = np.stack(losses)  # [steps, R]
  for k, s in enumerate(seeds):
    np.testing.assert_allclose(losses[:, k], single_losses(tiny_cfg(*extra, f"seed={s}"), steps), atol=1e-5,
                               err_msg=f"replica {k} (seed {s})")
  assert np.abs(losses[:, 0] - losses[:, 1]).max() > 1e-3  # the replicas are different runs
  # frozen leaves (the word embeddings) are one copy; trained ones one per replica
  single = rules.flat(build(tiny_cfg(*extra), **QUIET).initial_state().params)
  for p, x in rules.flat(state.params).items():
    assert x.shape == ((len(seeds),) + single[p].shape if p in exp.replicas.own else single[p].shape), p
  assert any(p not in exp.replicas.own for p in single)


def test_stacked_batches_pad_with_no_weight():
  a = {"input_ids": np.ones((2, 3), np.int32), "weights": np.ones((2,), np.float32), "index": np.arange(2)}
  b = {"input_ids": np.ones((4, 5), np.int32), "weights": np.ones((4,), np.float32), "index": np.arange(4)}
  s = replicas.stack_batches([a, b])
  assert s["input_ids"].shape == (2, 4, 5) and s["input_ids"][0, 2:].sum() == 0 and s["input_ids"][0, :2, 3:].sum() == 0
  assert s["weights"][0].tolist() == [1, 1, 0, 0] and s["index"][0].tolist() == [0, 1, -1, -1]


def test_seeds_config():
  from jaxft.config import load_config
  assert replicas.seeds_of(load_config(None, ("train.seeds=3", "seed=5"))) == [5, 6, 7]
  assert replicas.seeds_of(load_config(None, ("train.seeds=[0, 3, 7]",))) == [0, 3, 7]
  assert replicas.seeds_of(load_config(None, ())) == []
  for bad, msg in (("train.seeds=0", "count >= 1"), ("train.seeds=[1, 1]", "distinct"),
                   ("model.weights=random", "pretrained weights")):
    with pytest.raises(JaxftError, match=msg):
      load_config(None, ("train.seeds=2", bad) if bad.startswith("model") else (bad,))


def test_summary_is_the_t_interval():
  mean, half = replicas.summary([1.0, 2.0, 3.0])
  assert mean == 2.0 and abs(half - 4.302653 * 1.0 / np.sqrt(3)) < 1e-5


RUN = ("train.epochs=3", "train.eval_every=3", "train.checkpoint_every=3", "train.keep=1", "train.log_every=1",
       "freeze_embeddings=true")


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_data, tmp_path_factory):
  """Run dirs of: a 2-seed run; the single runs of its seeds; the 2-seed run stopped by SIGTERM after step 7
  and resumed; and its test line."""
  from conftest import tiny_overrides

  from jaxft.config import load_config
  from jaxft.train import train
  root = tmp_path_factory.mktemp("replicas")
  cfg = lambda name, *extra: load_config(None, tiny_overrides(tiny_bert, tiny_data, root / name) + RUN + extra)  # noqa: E731
  out = {}
  import contextlib
  import io
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    train(cfg("seeds", "train.seeds=[0, 3]"))
  out["line"] = printed.getvalue().strip().splitlines()[-1]
  for s in (0, 3):
    train(cfg(f"seed{s}", f"seed={s}"))
  stopped_then_resumed(cfg("resumed", "train.seeds=[0, 3]"), 7)
  return {**out, **{name: root / name for name in ("seeds", "seed0", "seed3", "resumed")}}


def test_each_replica_of_a_run_is_its_seeds_single_run(runs):
  """Train losses, validation, the best checkpoint and the test metrics of replica k are those of the
  single run with seed k; the test line is the mean ± CI."""
  for k, s in enumerate((0, 3)):
    single, vec = rows(runs[f"seed{s}"], "train"), rows(runs["seeds"], "train")
    assert [r["step"] for r in single] == [r["step"] for r in vec] and len(vec) >= 10
    np.testing.assert_allclose([r["loss_seeds"][k] for r in vec], [r["loss"] for r in single], atol=1e-5)
    np.testing.assert_allclose([r["accuracy_seeds"][k] for r in rows(runs["seeds"], "validation")],
                               [r["accuracy"] for r in rows(runs[f"seed{s}"], "validation")], atol=1e-6)
    record = Checkpointer(runs["seeds"] / "checkpoints", 1).record
    vec_record = record(max(Checkpointer(runs["seeds"] / "checkpoints", 1).steps()))
    single_ckpt = Checkpointer(runs[f"seed{s}"] / "checkpoints", 1)
    assert vec_record.best_steps[k] == single_ckpt.record(single_ckpt.latest_step()).best_step
    test_vec, test_single = rows(runs["seeds"], "test")[0], rows(runs[f"seed{s}"], "test")[0]
    for m in ("accuracy", "loss"):
      np.testing.assert_allclose(test_vec[f"{m}_seeds"][k], test_single[m], atol=1e-5, err_msg=m)
  test = rows(runs["seeds"], "test")[0]
  mean, half = replicas.summary(test["accuracy_seeds"])
  assert runs["line"].startswith("test ") and runs["line"].endswith("(2 seeds)")
  assert f"accuracy {mean:.4f} ± {half:.4f}" in runs["line"]


def test_a_preempted_run_of_replicas_resumes_exactly(runs):
  for split in ("train", "validation", "test"):
    want, got = rows(runs["seeds"], split), rows(runs["resumed"], split)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for key in ("loss_seeds", "accuracy_seeds"):
      if key in want[0]:
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], atol=1e-6, err_msg=f"{split} {key}")


def test_shared_params_are_stored_once_and_every_best_is_kept(runs):
  """The checkpoint holds a replica axis on trained params only: the frozen embeddings are one copy."""
  import orbax.checkpoint as ocp
  ckpt = Checkpointer(runs["seeds"] / "checkpoints", 1)
  latest = ckpt.latest_step()
  shapes = {p: tuple(x.shape) for p, x in rules.flat(ocp.StandardCheckpointer().metadata(
      ckpt.directory / str(latest) / "state").item_metadata["params"]).items()}
  single = Checkpointer(runs["seed0"] / "checkpoints", 1)
  single_shapes = {p: tuple(x.shape) for p, x in rules.flat(ocp.StandardCheckpointer().metadata(
      single.directory / str(single.latest_step()) / "state").item_metadata["params"]).items()}
  embeddings = [p for p in shapes if "embeddings" in p]
  assert embeddings and all(shapes[p] == single_shapes[p] for p in embeddings)
  assert all(shapes[p] == (2,) + single_shapes[p] for p in shapes if p not in embeddings)
  record = ckpt.record(latest)
  assert len(record.best_steps) == 2 and set(record.best_steps) <= set(ckpt.steps())  # keep=1, yet each best


PHASED = ("phases=[{name: probe, train_only: [classifier/.*], train: {cache_features: true}, steps: 6}, "
          "{name: tune, optim: {lr: 1e-3}, steps: 6}]", "train.log_every=1", "train.eval_every=3")


def test_phases_and_cached_features_run_per_replica(tiny_cfg):
  """A cached linear probe, then a fine-tune (the optimizer state carried over per replica): replica k's
  losses are those of the single run with seed k."""
  from jaxft.train import train
  vec = tiny_cfg(*PHASED, "train.seeds=[0, 3]")
  test = train(vec)
  assert len(test["accuracy_seeds"]) == 2
  for k, s in enumerate((0, 3)):
    single = tiny_cfg(*PHASED, f"seed={s}", f"run_dir={Path(vec.run_dir).parent / f'single{s}'}")
    train(single)
    np.testing.assert_allclose([r["loss_seeds"][k] for r in rows(vec.run_dir, "train")],
                               [r["loss"] for r in rows(single.run_dir, "train")], atol=1e-5, err_msg=f"seed {s}")


def test_cached_features_need_unchanged_backbones(tiny_cfg):
  spec = ("phases=[{name: tune, steps: 2}, {name: probe, train_only: [classifier/.*], "
          "train: {cache_features: true}, steps: 2}]")
  with pytest.raises(JaxftError, match="cache_features with train.seeds"):
    build(tiny_cfg(spec, "train.seeds=2"), **QUIET)


def test_eval_and_export_of_a_replicated_run(runs, tmp_path):
  """`jaxft eval` tests each replica at its best checkpoint (as training did); export needs --replica."""
  from jaxft.config import load_config
  from jaxft.evaluate import evaluate_run
  from jaxft.export import export
  cfg = load_config(str(runs["seeds"] / "config.yaml"), ())
  got = evaluate_run(cfg, "test", log=lambda *_: None)
  np.testing.assert_allclose(got["accuracy_seeds"], rows(runs["seeds"], "test")[0]["accuracy_seeds"], atol=1e-6)
  with pytest.raises(JaxftError, match="--replica"):
    export(cfg, tmp_path / "out", log=lambda *_: None)
  out = export(cfg, tmp_path / "out1", log=lambda *_: None, replica=1)
  alone = load_config(str(runs["seeds"] / "config.yaml"), (f"model.name={out}", "train.seeds=null",
                                                           f"run_dir={tmp_path / 'none'}"))
  np.testing.assert_allclose(evaluate_run(alone, "test", log=lambda *_: None)["accuracy"], got["accuracy_seeds"][1],
                             atol=1e-6)
