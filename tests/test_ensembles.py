"""Weight-space ensembles (ensembles.py: WiSE-FT interpolation, model soups), the gradient noise scale
of accumulated steps, and `jaxft plot`."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft import rules
from jaxft.checkpoint import Checkpointer
from jaxft.errors import JaxftError
from jaxft.noise_scale import estimates as noise_estimates

QUIET = lambda *_: None  # noqa: E731
PHASED = ("phases=[{name: probe, train_only: [classifier/.*], steps: 6}, {name: tune, optim: {lr: 1e-3}, steps: 6}]",
          "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=3", "train.keep=1",
          "freeze_embeddings=true")


@pytest.fixture(scope="module")
def lp_ft(tiny_bert, tiny_data, tmp_path_factory):
  """The config of a finished 2-seed run: a linear probe, then a fine-tune (keep=1: only the bests and the
  probe's end survive)."""
  from conftest import tiny_overrides

  from jaxft.config import load_config
  from jaxft.train import train
  cfg = load_config(None, tiny_overrides(tiny_bert, tiny_data, tmp_path_factory.mktemp("lp_ft") / "run") + PHASED
                    + ("train.seeds=[0, 3]", "train.best_metric=loss"))  # (loss: the tune phase improves on it)
  train(cfg)
  return load_config(str(Path(cfg.run_dir) / "config.yaml"), ())


def test_interpolation_runs_from_the_probe_to_the_fine_tuned_weights(lp_ft):
  """alpha 0 is the probe's checkpoint (the backbone as loaded + the probe's head), alpha 1 the run's
  best: both as `jaxft eval` scores those checkpoints."""
  from jaxft.ensembles import interpolate
  from jaxft.evaluate import evaluate_run
  ckpt = Checkpointer(Path(lp_ft.run_dir) / "checkpoints", 1)
  record = ckpt.record(ckpt.latest_step())
  assert record.probe_step == 6 and 6 in ckpt.steps()  # kept beyond train.keep
  rows = interpolate(lp_ft, [0.0, 0.5, 1.0], QUIET)
  got = {(r["alpha"], r["split"]): r for r in rows}
  assert len(rows) == 6
  for split in ("validation", "test"):
    probe = evaluate_run(lp_ft, split, step=6, log=QUIET)
    best = evaluate_run(lp_ft, split, log=QUIET)
    for key in ("accuracy_seeds", "loss_seeds"):
      np.testing.assert_allclose(got[(0.0, split)][key], probe[key], atol=1e-5, err_msg=f"alpha 0 {split} {key}")
      np.testing.assert_allclose(got[(1.0, split)][key], best[key], atol=1e-5, err_msg=f"alpha 1 {split} {key}")
    assert not np.allclose(got[(0.5, split)]["loss_seeds"], best["loss_seeds"])
  written = [json.loads(line) for line in open(Path(lp_ft.run_dir) / "interpolate.jsonl")]
  assert [(r["alpha"], r["split"]) for r in written] == [(r["alpha"], r["split"]) for r in rows]
  assert (Path(lp_ft.run_dir) / "interpolate.png").stat().st_size > 10_000


def test_soups_of_the_replicas(lp_ft, tmp_path):
  """Each replica's row is its own test score; the greedy soup starts from the best replica on validation (by
  the run's best metric, loss) and its written model scores what the soup scored."""
  from jaxft.config import load_config
  from jaxft.ensembles import soup
  from jaxft.evaluate import evaluate_run
  rows = soup(lp_ft, tmp_path / "soup", QUIET)
  by = {r["soup"]: r for r in rows}
  test = [json.loads(line) for line in open(Path(lp_ft.run_dir) / "metrics.jsonl") if '"test"' in line][0]
  for r in (0, 1):
    np.testing.assert_allclose(by[f"replica {r}"]["test/accuracy"], test["accuracy_seeds"][r], atol=1e-6)
  assert by["uniform"]["members"] == [0, 1]
  best = min((0, 1), key=lambda r: by[f"replica {r}"]["validation/loss"])  # the run's train.best_metric
  assert best in by["greedy"]["members"]
  assert by["greedy"]["validation/loss"] <= by[f"replica {best}"]["validation/loss"]
  alone = load_config(str(Path(lp_ft.run_dir) / "config.yaml"),
                      (f"model.name={tmp_path / 'soup'}", "train.seeds=null", "phases=[]", f"run_dir={tmp_path / 'x'}"))
  np.testing.assert_allclose(evaluate_run(alone, "test", log=QUIET)["loss"], by["greedy"]["test/loss"], atol=1e-5)
  with pytest.raises(JaxftError, match="not empty"):
    soup(lp_ft, tmp_path / "soup", QUIET)


@pytest.fixture(scope="module")
def accumulated(tiny_bert, tiny_data, tmp_path_factory):
  """The config of a finished single run with gradient accumulation (4 micro-batches of 4)."""
  from conftest import tiny_overrides

  from jaxft.config import load_config
  from jaxft.train import train
  cfg = load_config(None, tiny_overrides(tiny_bert, tiny_data, tmp_path_factory.mktemp("accum") / "run")
                    + ("train.micro_batch_size=4", "train.epochs=1"))
  train(cfg)
  return cfg


def test_soup_needs_replicas(accumulated):
  from jaxft.ensembles import soup
  with pytest.raises(JaxftError, match="single run"):
    soup(accumulated, None, QUIET)


def test_theta_zero_turns_lora_adapters_off(tiny_cfg):
  from jaxft.ensembles import theta_zero
  from jaxft.experiment import build
  exp = build(tiny_cfg("lora.preset=qv"), QUIET)
  flat = rules.flat(exp.initial_state().params)
  tuned = rules.merge({p: x + 1.0 for p, x in flat.items()})
  start = rules.flat(theta_zero(exp, tuned, {})[0])
  lora_b = [p for p in flat if p.endswith("lora_b")]
  assert lora_b and all(not start[p].any() for p in lora_b)
  for p in flat:
    if p.endswith("lora_a") or p.startswith("classifier/"):
      np.testing.assert_array_equal(start[p], flat[p] + 1.0)  # the fine-tuned ones
    elif not p.endswith("lora_b"):
      np.testing.assert_array_equal(start[p], flat[p])  # the backbone as loaded


def test_accumulated_runs_log_the_noise_scale(accumulated):
  train_rows = [json.loads(line) for line in open(Path(accumulated.run_dir) / "metrics.jsonl") if '"train"' in line]
  assert train_rows and all(np.isfinite(r["noise_scale"]) and np.isfinite(r["noise_scale_phase"]) for r in train_rows)


def test_plot_draws_runs_overlaid(lp_ft, accumulated, tmp_path):
  from conftest import jaxft
  out = jaxft("plot", lp_ft.run_dir, accumulated.run_dir, "--out", str(tmp_path / "runs.png"))
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "runs.png").stat().st_size > 20_000
  bad = jaxft("plot", str(tmp_path / "nothing"))
  assert bad.returncode == 2 and "metrics.jsonl does not exist" in bad.stderr


def test_noise_estimates_are_unbiased():
  """Per-example gradients G + noise (covariance sigma^2 I): the two-batch-size estimates average to
  |G|^2 and tr(Sigma)."""
  rng = np.random.default_rng(0)
  dim, b, k, trials, sigma = 20, 4, 8, 4000, 0.5
  G = rng.normal(size=dim)
  per_example = G + sigma * rng.normal(size=(trials, k, b, dim))
  small = per_example.mean(2)  # [trials, k, dim]: micro-batch gradients
  small_sq, big_sq = (small ** 2).sum(-1).mean(1), (small.mean(1) ** 2).sum(-1)
  g2, trace = noise_estimates(small_sq, b, big_sq, b * k)
  np.testing.assert_allclose(g2.mean(), (G ** 2).sum(), rtol=0.02)
  np.testing.assert_allclose(trace.mean(), sigma ** 2 * dim, rtol=0.02)


def test_an_accumulated_step_measures_the_noise_scale(tiny_cfg):
  """The step's estimate is the formula applied to the micro-batches' gradient norms, each measured alone
  (micro-batch i: rows i, i + k, ...)."""
  from jaxft.experiment import build
  from jaxft.noise_scale import EMA as NOISE_EMA
  exp = build(tiny_cfg("train.micro_batch_size=4", "train.dropout=false", "data.pack=false"), QUIET)
  batch = exp.train_batches()[0]
  state, m = jax.jit(exp.train_step(0))(exp.initial_state(), batch)
  one = build(tiny_cfg("train.dropout=false", "data.pack=false"), QUIET)
  step = jax.jit(one.train_step(0))
  k = 4
  norms, weights = [], []
  for i in range(k):
    mb = jax.tree.map(lambda x: x[i::k], batch)
    norms.append(float(step(one.initial_state(), mb)[1]["grad_norm"]) ** 2)
    weights.append(float(np.sum(mb["weights"])))
  big = float(step(one.initial_state(), batch)[1]["grad_norm"]) ** 2
  g2, trace = noise_estimates(np.mean(norms), np.mean(weights), big, sum(weights))
  np.testing.assert_allclose(float(m["noise_scale"]), trace / g2, rtol=1e-3)
  np.testing.assert_allclose(float(m["noise_grad_sq"]), g2, rtol=1e-3)
  noise = state.hooks["noise"]
  assert noise.shape == (6,) and abs(float(noise[2]) - (1 - NOISE_EMA)) < 1e-6
  np.testing.assert_allclose(float(m["noise_scale_phase"]), trace / g2, rtol=1e-3)  # one step: the same
