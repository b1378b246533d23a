"""grpo: advantages within groups, the policy loss and its gradient on a toy policy, rewards that fail in one
line, the reference as the model loaded (KL 0 at the first step, LoRA or not), and a run whose reward rises."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lm_overrides

from jaxft.config import load_config
from jaxft.errors import JaxftError
from jaxft.tasks import grpo
from jaxft.train import train

REWARD = "helpers.rewards:share_of_e"  # tests/helpers/rewards.py


def test_advantages_are_relative_to_the_group():
  r = np.array([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2]], np.float32)
  np.testing.assert_allclose(grpo.advantages(r, "grpo")[0], [0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001],
                             rtol=1e-5)
  np.testing.assert_array_equal(grpo.advantages(r, "grpo")[1], 0.0)  # a group that agrees teaches nothing
  np.testing.assert_allclose(grpo.advantages(r, "dr_grpo")[0], [0.5, -0.5, -0.5, 0.5])


@pytest.mark.parametrize("normalise", ["grpo", "dr_grpo"])
def test_policy_loss_and_its_gradient_on_a_toy_policy(normalise):
  """Logits as the policy's params: the loss is the completions' mean of their tokens' -A (ratio 1) plus beta
  times the KL estimate, each completion's tokens averaged (grpo) or summed over max_new (dr_grpo); its
  gradient is that of -A log p + beta KL (the ratio's own gradient is log p's)."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)  # 3 completions (one group), 4 tokens
  batch = {"labels": jnp.asarray(rng.integers(0, 6, (3, 4)), jnp.int32),
           "completion": jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32),
           "advantages": jnp.asarray([1.5, -0.5, 0.0]), "ref_logps": jnp.asarray(rng.normal(size=(3, 4)) - 2.0),
           "weights": jnp.asarray([1.0, 1.0, 0.0]), "rewards": jnp.asarray([1.0, 0.0, 0.5]),
           "group_std": jnp.asarray([0.5, 0.5, 0.5])}
  beta, max_new = 0.1, 5

  def reference(logits):
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][..., None], -1)[..., 0]
    d = batch["ref_logps"] - logp
    per_token = -batch["advantages"][:, None] * logp + beta * (jnp.exp(d) - d - 1)
    m = batch["completion"]
    n = max_new if normalise == "dr_grpo" else m.sum(1)
    per_row = (per_token * m).sum(1) / n
    return (per_row * batch["weights"]).sum() / batch["weights"].sum()

  loss_fn = lambda x: grpo.policy_loss(x, batch, beta, 0.2, normalise, max_new)[0]  # noqa: E731
  value, aux = grpo.policy_loss(logits, batch, beta, 0.2, normalise, max_new)
  logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(batch["labels"])[..., None], -1)[..., 0]
  d = np.asarray(batch["ref_logps"]) - logp
  m, w, a = (np.asarray(batch[k]) for k in ("completion", "weights", "advantages"))
  per_token = -a[:, None] + beta * (np.exp(d) - d - 1)  # at ratio 1, the clipped term is -A
  per_row = (per_token * m).sum(1) / (max_new if normalise == "dr_grpo" else m.sum(1))
  np.testing.assert_allclose(value, (per_row * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(loss_fn)(logits), jax.grad(reference)(logits), rtol=1e-5, atol=1e-7)
  assert aux["reward"] == pytest.approx(0.5) and aux["completion_length"] == pytest.approx(2.5)


def test_grouped_forward_equals_rows_of_prompt_and_completion(grpo_cfg):
  """A prompt's pass once, its cache copied to its completions (grpo's step and reference), gives each completion
  token the log-probability that a row of prompt + completion gives it, prompts of different lengths."""
  from jaxft.experiment import build
  from jaxft.tasks.base import nll
  exp = build(grpo_cfg("data.limit={train: 8, validation: 8, test: 8}"), lambda *a: None)
  params, ms = exp.initial_state().params, exp.backbone.state
  prompts = [list(p) for p in exp.splits["train"].meta["prompts"][:2]]
  assert len(prompts[0]) != len(prompts[1])
  G, S, P = 3, 5, max(map(len, prompts)) + 2
  rng = np.random.default_rng(0)
  labels = rng.integers(3, 60, (2, G, S)).astype(np.int32)
  batch = {"prompt_ids": np.zeros((2, P), np.int32), "prompt_mask": np.zeros((2, P), np.int32), "labels": labels}
  for b, p in enumerate(prompts):
    batch["prompt_ids"][b, P - len(p):], batch["prompt_mask"][b, P - len(p):] = p, 1
  logits, _ = jax.jit(grpo.grouped(exp.apply, exp.backbone.new_cache))(params, batch, False, None, ms)
  got = -np.asarray(nll(logits, labels))
  for b, p in enumerate(prompts):
    for g in range(G):
      row = np.r_[p, labels[b, g]][None].astype(np.int32)
      whole = exp.apply(params, {"input_ids": row, "attention_mask": np.ones_like(row)}, False, None, ms)[0]
      want = -np.asarray(nll(whole[0, len(p) - 1:-1], labels[b, g]))
      np.testing.assert_allclose(got[b, g], want, atol=2e-5)


@pytest.fixture
def grpo_cfg(tiny_llama, sft_data, tmp_path):
  def make(*extra):
    return load_config(None, lm_overrides(tiny_llama["tied"], sft_data, tmp_path / "run", "grpo") + (
        "task.eval_examples=16", f"task.reward={REWARD}", "train.batch_size=8", "task.group_size=4",
        "task.max_new_tokens=8", "optim.lr=1e-2") + extra)
  return make


def rows(run_dir, split="train"):
  return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.parametrize("adapters", [(), ("lora.preset=all", "lora.rank=4")])
def test_the_reference_is_the_model_loaded(grpo_cfg, tmp_path, adapters):
  """At the first step the policy is the model loaded, the reference too: KL 0, LoRA (base, adapters off) or not
  (the loaded copy)."""
  train(grpo_cfg("train.log_every=1", "data.limit={train: 16, validation: 8, test: 8}", *adapters))
  first, second = rows(tmp_path / "run")[:2]
  assert first["kl"] == pytest.approx(0.0, abs=1e-6) and second["kl"] > 0, (first, second)
  assert first["completion_length"] > 0 and 0 <= first["reward"] <= 1


def test_grpo_run_raises_the_reward(grpo_cfg, tmp_path):
  """A dense reward (the share of 'e's) a tiny random model can learn: its mean rises over 32 steps, the spread
  within groups falls, the KL to the reference grows; evaluation reports the greedy answers' mean reward."""
  train(grpo_cfg("train.log_every=4"))
  train_rows = rows(tmp_path / "run")
  assert train_rows[-1]["reward"] > 2 * train_rows[0]["reward"] > 0, train_rows
  assert train_rows[-1]["kl"] > train_rows[0]["kl"]
  assert {"reward", "exact_match", "loss"} <= set(rows(tmp_path / "run", "test")[0])
  from jaxft import plots  # jaxft plot draws grpo's own metrics beside the loss
  assert plots.read_run(tmp_path / "run")[1:] == ("reward", grpo.GRPO.train_metrics)
  assert plots.runs([tmp_path / "run"], tmp_path / "plot.png").stat().st_size > 20_000


@pytest.mark.parametrize("reward,says", [("raises", "raised ValueError: no score for this one"),
                                         ("not_a_number", "returned 'high' for .*, not a finite number")])
def test_a_reward_that_fails_is_one_line_naming_the_example(grpo_cfg, reward, says):
  with pytest.raises(JaxftError, match=rf"train.jsonl:\d+: task.reward helpers.rewards:{reward} {says}"):
    train(grpo_cfg(f"task.reward=helpers.rewards:{reward}", "data.limit={train: 16, validation: 8, test: 8}"))
  with pytest.raises(JaxftError, match="config key 'task.reward': cannot import 'helpers.rewards:missing'"):
    train(grpo_cfg("task.reward=helpers.rewards:missing"))


def test_bench_and_plan_refuse_in_one_line(grpo_cfg):
  """jaxft bench and jaxft plan take a step's batches from the data; grpo makes its own (not yet theirs)."""
  from jaxft.bench import bench
  from jaxft.plan import plan
  with pytest.raises(JaxftError, match="jaxft bench times a step on batches from the data; task.name grpo makes"):
    bench(grpo_cfg(), steps=1, warmup=0, log=lambda *_: None)
  with pytest.raises(JaxftError, match="jaxft plan compiles a step on batches from the data; task.name grpo makes"):
    plan(grpo_cfg(), "v5e:2x2", log=lambda *_: None)
