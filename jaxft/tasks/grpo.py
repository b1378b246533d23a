"""Group relative policy optimisation (GRPO; Shao et al. 2024, DeepSeekMath) of a causal LM: for each prompt,
sample task.group_size completions with the generate loop, score each with a reward, and push the policy
towards the completions that beat their group's mean.

Records are SFT's (prompt / response pairs, or chat messages): the prompt is what is completed, the response
the reference answer the built-in rewards and evaluation compare with. Each training step (`rollout`, called
by the loop before the step):
  1. samples group_size completions of each of the batch's prompts (task.rollout_temperature, task.top_p, up
     to task.max_new_tokens), with the policy's current params;
  2. scores them: task.reward is `exact_match` (1 where the completion equals the reference answer, SQuAD-
     normalised), `regex` (1 where task.reward_regex matches), or `module:function`, a Python function called
     as f(completion=..., answer=..., prompt=...) -> a number; one that raises, or returns no finite number,
     is a one-line error naming the example;
  3. normalises rewards within each group: A = (r - mean) / (std + 1e-4), or (task.normalise: dr_grpo, Liu
     et al. 2025) A = r - mean;
  4. computes the reference's per-token log-probabilities (the model as loaded: with LoRA, the base with the
     adapters off; else one kept copy of the loaded weights).
Each prompt's pass runs once and its KV cache is copied to its group's completions (`grouped`), in sampling, in
the reference's pass and in the step; every rollout has one shape, so each compiles once.
The loss per completion token is the clipped policy gradient -min(rho A, clip(rho, 1 - eps, 1 + eps) A) plus
task.kl times the KL estimate exp(ref - logp) - (ref - logp) - 1; a completion's loss is its tokens' mean
(grpo) or their sum over task.max_new_tokens (dr_grpo, no length bias), and the step's the mean over
completions. One update per rollout: rho is 1 with the gradient of logp (the old policy is the current one).
Train metrics per step: reward (mean), reward_std (within groups), kl, completion_length. Evaluation is SFT's
(the reference answers' loss, exact match of greedy answers) and the mean reward of those greedy answers.
"""
import dataclasses
import importlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import lora, rules
from jaxft.errors import JaxftError
from jaxft.tasks.base import nll, where
from jaxft.tasks.sft import SFT, normalise_answer
from jaxft.tasks.sft import Config as SFTConfig

NORMALISATIONS = ("grpo", "dr_grpo")


@dataclasses.dataclass
class Config(SFTConfig):
  """SFT's records; a reward, and how completions are sampled and weighed."""
  group_size: int = 8  # completions sampled per prompt (train.batch_size counts prompts)
  reward: str = "exact_match"  # exact_match | regex | module:function
  reward_regex: str | None = None  # reward: regex
  rollout_temperature: float = 1.0  # sampling the completions (task.temperature: evaluation's generation)
  kl: float = 0.04  # the KL penalty's weight (beta)
  clip: float = 0.2  # the ratio's clipping range (epsilon)
  normalise: str = "grpo"  # grpo | dr_grpo

  def check(self) -> None:
    super().check()
    self.require(self.group_size >= 2, f"config key 'task.group_size' must be >= 2 (advantages compare the "
                                       f"completions of a prompt), got {self.group_size}")
    self.require(self.rollout_temperature > 0, f"config key 'task.rollout_temperature' must be > 0, got "
                                               f"{self.rollout_temperature}")
    self.require(self.kl >= 0 and self.clip > 0, f"config keys 'task.kl' >= 0 and 'task.clip' > 0, got {self.kl}, "
                                                 f"{self.clip}")
    self.require(self.normalise in NORMALISATIONS, f"config key 'task.normalise' must be one of "
                                                   f"{', '.join(NORMALISATIONS)}, got {self.normalise!r}")
    if self.reward == "regex":
      self.require(bool(self.reward_regex), "task.reward=regex needs task.reward_regex")
      try:
        re.compile(self.reward_regex)
      except re.error as e:
        raise JaxftError(f"config key 'task.reward_regex': {e}") from None
    else:
      self.require(self.reward == "exact_match" or ":" in self.reward,
                   f"config key 'task.reward' must be exact_match, regex or module:function, got {self.reward!r}")


def reward_function(t):
  """f(completion, answer, prompt) -> float for task.reward."""
  if t.reward == "exact_match":
    return lambda completion, answer, prompt: float(normalise_answer(completion) == normalise_answer(answer))
  if t.reward == "regex":
    pattern = re.compile(t.reward_regex)
    return lambda completion, answer, prompt: float(pattern.search(completion) is not None)
  module, _, name = t.reward.partition(":")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise JaxftError(f"config key 'task.reward': cannot import {t.reward!r}: {e}") from None


def advantages(rewards_BxG, normalise: str):
  """[B, G] each completion's reward against its group's: (r - mean) / (std + 1e-4), or r - mean (dr_grpo)."""
  centred = rewards_BxG - rewards_BxG.mean(1, keepdims=True)
  return centred if normalise == "dr_grpo" else centred / (rewards_BxG.std(1, keepdims=True) + 1e-4)


def grouped(apply, new_cache):
  """apply for rollout batches (prompt_ids / prompt_mask [B, P] left-padded, labels [B, G, S] the completions'
  tokens): each prompt's pass once, its KV cache copied to its G completions, whose tokens then run against it.
  -> (logits [B, G, S, V] predicting each completion token, the first from the prompt's last position; the
  model state as given). The same logits as G rows of prompt + completion, at about 1/G of the prompts' cost."""
  from jaxft.generate import prefill

  def forward(params, batch, train=False, rng=None, model_state=None):
    B, G, S = batch["labels"].shape
    last_RxV, state, lengths_R = prefill(apply, params, model_state, batch["prompt_ids"], batch["prompt_mask"],
                                         new_cache, S, G, train, rng)
    ids_RxS = batch["labels"].reshape(B * G, S)[:, :-1]  # (the last token predicts nothing scored)
    step = {"input_ids": ids_RxS, "attention_mask": jnp.ones_like(ids_RxS),
            "position_ids": lengths_R[:, None] + jnp.arange(S - 1)}
    logits_RxSxV, _ = apply(params, step, train, rng, state)
    logits_RxSxV = jnp.concatenate([last_RxV[:, None], logits_RxSxV], 1)
    return logits_RxSxV.reshape(B, G, S, -1), model_state
  return forward


def policy_loss(logits_BxGxSxV, batch, kl: float, clip: float, normalise: str, max_new: int):
  """(the step's loss, its metrics): the clipped policy gradient and the KL estimate per completion token
  (batch: labels, completion, ref_logps [B, G, S]; advantages, rewards, group_std, weights [B, G])."""
  logp_BxGxS = -nll(logits_BxGxSxV, batch["labels"])
  ratio_BxGxS = jnp.exp(logp_BxGxS - jax.lax.stop_gradient(logp_BxGxS))  # 1, with logp's gradient
  a_BxGx1 = batch["advantages"][..., None]
  pg_BxGxS = -jnp.minimum(ratio_BxGxS * a_BxGx1, jnp.clip(ratio_BxGxS, 1 - clip, 1 + clip) * a_BxGx1)
  d_BxGxS = batch["ref_logps"] - logp_BxGxS
  kl_BxGxS = jnp.exp(d_BxGxS) - d_BxGxS - 1
  m_BxGxS, w_BxG = batch["completion"], batch["weights"]
  tokens_BxG = m_BxGxS.sum(-1)
  per_BxG = ((pg_BxGxS + kl * kl_BxGxS) * m_BxGxS).sum(-1)
  per_BxG = per_BxG / (max_new if normalise == "dr_grpo" else jnp.maximum(tokens_BxG, 1.0))
  n = jnp.maximum(w_BxG.sum(), 1.0)
  mean = lambda x_BxG: jnp.sum(x_BxG * w_BxG) / n  # noqa: E731
  return mean(per_BxG), {"reward": mean(batch["rewards"]), "reward_std": mean(batch["group_std"]),
                         "kl": mean((kl_BxGxS * m_BxGxS).sum(-1) / jnp.maximum(tokens_BxG, 1.0)),
                         "completion_length": mean(tokens_BxG)}


class GRPO(SFT):
  metrics = ("loss", "perplexity", "token_accuracy", "exact_match", "reward")
  best_metric = "reward"
  train_metrics = ("reward", "reward_std", "kl", "completion_length")
  on_policy = True

  def __init__(self, cfg, backbone, source, log=print):
    super().__init__(cfg, backbone, source, log)
    self.reward = reward_function(cfg.task)
    if cfg.train.seeds or cfg.train.sweep or jax.process_count() > 1:
      raise JaxftError("task.name grpo runs in one process and without train.seeds or train.sweep (not yet "
                       "supported)")
    def logits_of(params, batch, train, rng, state):  # the backbone's apply, giving logits as the task's does
      out, state = backbone.apply(params, batch, train, rng, state)
      return out["logits"], state

    ref = grouped(logits_of, backbone.new_cache)
    self._reference = jax.jit(lambda params, batch: -nll(ref(params, batch, False, None, backbone.state)[0],
                                                         batch["labels"]))
    # The reference: with LoRA the base weights in the train state, adapters off; else a copy of the weights
    # as loaded, kept (on the host here, on the device from the first rollout): the step updates the others
    self._lora = bool(lora.targets(cfg.lora, backbone.conventions))
    self._loaded = None if self._lora else jax.device_get(backbone.params)

  def cannot_pack(self):
    return "task.name grpo trains on completions it generates, one a row"

  def rewards(self, completions: list[str], index: list[int], ex, split: str = "train") -> np.ndarray:
    """[N] the reward of each completion of example index[i]; a reward that raises or is no finite number is
    a one-line error naming the example."""
    out = np.zeros(len(completions), np.float32)
    for n, (text, i) in enumerate(zip(completions, index, strict=True)):
      origin = ex.meta["origins"][i] if "origins" in ex.meta else f"{split} example {i}"
      try:
        r = self.reward(completion=text, answer=ex.meta["answers"][i], prompt=ex.meta["prompt_texts"][i])
      except Exception as e:  # noqa: BLE001 (the user's function: any error is theirs, said in one line)
        raise JaxftError(f"{origin}: task.reward {self.cfg.task.reward} raised {type(e).__name__}: {e}") from None
      if isinstance(r, bool) or not isinstance(r, (int, float, np.number)) or not math.isfinite(float(r)):
        raise JaxftError(f"{origin}: task.reward {self.cfg.task.reward} returned {r!r} for {text[:40]!r}, not a "
                         f"finite number")
      out[n] = float(r)
    return out

  def encode(self, records, split):
    ex = super().encode(records, split)
    t = self.cfg.task
    ex.meta["origins"] = [where(records, i, split) for i in range(len(records))]
    ex.meta["prompt_texts"] = [r.get(t.prompt_column, "") if isinstance(r.get(t.prompt_column), str) else
                               str(r.get(t.messages_column, "")) for r in records]
    return ex

  def forward(self, apply):
    return grouped(apply, self.backbone.new_cache)

  def rollout(self, exp, par, state, batch: dict, step: int) -> dict:
    """The step's batch: each prompt (left-padded to the length bucket of the split's longest, so that sampling,
    the reference's pass and the step compile once) with its group_size sampled completions (task.max_new_tokens + 1
    slots, rounded up to 8, the end of turn included), their rewards and advantages, and the reference's
    log-probabilities of every completion token."""
    from jaxft.generate import generate, prompt_length
    t, ex, tok = self.cfg.task, exp.splits["train"], self.backbone.processor
    G, B = t.group_size, len(batch["index"])
    idx = [int(i) for i in batch["index"] if i >= 0]
    prompts = [ex.meta["prompts"][i] for i in idx]
    if "prompt_length" not in ex.meta:
      ex.meta["prompt_length"] = prompt_length(exp, max(map(len, ex.meta["prompts"])))
    P, S = ex.meta["prompt_length"], -(-(t.max_new_tokens + 1) // 8) * 8
    tokens = generate(exp, state.params, state.model_state, prompts, t.max_new_tokens, t.rollout_temperature,
                      t.top_p, seed=exp.cfg.seed * 1_000_003 + step, batch_size=B, par=par, repeat=G, pad_to=P)
    texts = tok.batch_decode(tokens, skip_special_tokens=True)
    rewards = self.rewards(texts, [i for i in idx for _ in range(G)], ex).reshape(len(idx), G)
    out = {"prompt_ids": np.full((B, P), self.pad_id, np.int32), "prompt_mask": np.zeros((B, P), np.int32),
           "labels": np.full((B, G, S), self.pad_id, np.int32), "completion": np.zeros((B, G, S), np.float32)}
    out["prompt_mask"][len(idx):, -1] = 1  # padding examples: one visible token, nothing scored
    for b, p in enumerate(prompts):
      out["prompt_ids"][b, P - len(p):], out["prompt_mask"][b, P - len(p):] = p, 1
      for g in range(G):
        c = tokens[b * G + g]
        c = c + [self.eos_id] if len(c) < t.max_new_tokens else c
        out["labels"][b, g, :len(c)], out["completion"][b, g, :len(c)] = c, 1
    pad = lambda x_BxG: np.r_[x_BxG, np.zeros((B - len(idx), G), np.float32)].astype(np.float32)  # noqa: E731
    ref = np.asarray(self._reference(self.reference_params(state), out))
    return {**out, "ref_logps": ref, "advantages": pad(advantages(rewards, t.normalise)), "rewards": pad(rewards),
            "group_std": pad(np.repeat(rewards.std(1, keepdims=True), G, 1)), "weights": pad(np.ones_like(rewards))}

  def reference_params(self, state):
    """The reference model's params (the backbone's subtree): the base of a LoRA state, or the loaded copy."""
    own = state.params[self.backbone.key]
    if self._lora:
      return rules.merge({p: x for p, x in rules.flat(own).items() if not lora.is_adapter(p)})
    if not isinstance(jax.tree.leaves(self._loaded)[0], jax.Array):  # the host copy, put beside the params once
      self._loaded = jax.tree.map(lambda x, like: jax.device_put(x, like.sharding), self._loaded, own)
    return self._loaded

  def loss(self, logits_RxPxV, batch):
    t = self.cfg.task
    return policy_loss(logits_RxPxV, batch, t.kl, t.clip, t.normalise, t.max_new_tokens)

  def score(self, generated, ex, index) -> dict:
    """SFT's exact match of the greedy answers, and their mean reward."""
    rewards = self.rewards(generated, list(index), ex, "evaluation")
    return {**super().score(generated, ex, index), "reward": float(rewards.mean()) if len(rewards) else float("nan")}
