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
     adapters off; no second copy of the weights, these are the loaded ones).
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
from jaxft.data import batching
from jaxft.errors import JaxftError
from jaxft.tasks.base import nll, where
from jaxft.tasks.causal_lm import shifted
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


def policy_loss(logits_RxPxV, batch, kl: float, clip: float, normalise: str, max_new: int):
  """(the step's loss, its metrics): the clipped policy gradient and the KL estimate per completion token."""
  logp_RxP = -nll(logits_RxPxV, batch["labels"])
  ratio_RxP = jnp.exp(logp_RxP - jax.lax.stop_gradient(logp_RxP))  # 1, with logp's gradient
  a_Rx1 = batch["advantages"][:, None]
  pg_RxP = -jnp.minimum(ratio_RxP * a_Rx1, jnp.clip(ratio_RxP, 1 - clip, 1 + clip) * a_Rx1)
  d_RxP = batch["ref_logps"] - logp_RxP
  kl_RxP = jnp.exp(d_RxP) - d_RxP - 1
  m_RxP, w_R = batch["completion"], batch["weights"]
  tokens_R = m_RxP.sum(1)
  per_R = (pg_RxP + kl * kl_RxP) * m_RxP
  per_R = per_R.sum(1) / (max_new if normalise == "dr_grpo" else jnp.maximum(tokens_R, 1.0))
  n = jnp.maximum(w_R.sum(), 1.0)
  mean = lambda x_R: jnp.sum(x_R * w_R) / n  # noqa: E731
  return mean(per_R), {"reward": mean(batch["rewards"]), "reward_std": mean(batch["group_std"]),
                       "kl": mean((kl_RxP * m_RxP).sum(1) / jnp.maximum(tokens_R, 1.0)),
                       "completion_length": mean(tokens_R)}


class GRPO(SFT):
  metrics = ("loss", "perplexity", "token_accuracy", "exact_match", "reward")
  best_metric = "reward"
  on_policy = True

  def __init__(self, cfg, backbone, source, log=print):
    super().__init__(cfg, backbone, source, log)
    self.reward = reward_function(cfg.task)
    if cfg.train.seeds or jax.process_count() > 1:
      raise JaxftError("task.name grpo runs in one process and without train.seeds (not yet supported)")
    self._reference = jax.jit(lambda params, batch: -nll(
        backbone.apply(params, batch, False, None, backbone.state)[0]["logits"], batch["labels"]))
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

  def rollout(self, exp, par, state, batch: dict, step: int) -> dict:
    """The step's batch of sampled completions: rows prompt + completion, their rewards and advantages, and
    the reference's log-probabilities of every completion token."""
    from jaxft.generate import generate
    t, ex, tok = self.cfg.task, exp.splits["train"], self.backbone.processor
    G = t.group_size
    idx = [int(i) for i in batch["index"] if i >= 0]
    prompts = [ex.meta["prompts"][i] for i in idx for _ in range(G)]
    tokens = generate(exp, state.params, state.model_state, prompts, t.max_new_tokens, t.rollout_temperature,
                      t.top_p, seed=exp.cfg.seed * 1_000_003 + step, batch_size=len(prompts), par=par)
    texts = tok.batch_decode(tokens, skip_special_tokens=True)
    rewards_BxG = self.rewards(texts, [i for i in idx for _ in range(G)], ex).reshape(len(idx), G)
    adv = advantages(rewards_BxG, t.normalise).reshape(-1)
    rows = [np.r_[p, c, [self.eos_id] if len(c) < t.max_new_tokens else []].astype(np.int32)
            for p, c in zip(prompts, tokens, strict=True)]
    completion = [np.r_[np.zeros(len(p)), np.ones(len(r) - len(p))].astype(np.int32) for p, r in zip(prompts, rows)]
    R = len(batch["index"]) * G  # (rows of padding examples stay empty, weight 0)
    L = batching.bucket(max(map(len, rows)), batching.derived_buckets(max(max(map(len, rows)), 16)))
    ids_RxL = np.full((R, L), self.pad_id, np.int32)
    marks_RxL = np.zeros((R, L), np.int32)
    mask_RxL = np.zeros((R, L), np.int32)
    for r, (x, m) in enumerate(zip(rows, completion, strict=True)):
      ids_RxL[r, :len(x)], marks_RxL[r, :len(x)], mask_RxL[r, :len(x)] = x, m, 1
    mask_RxL[len(rows):, 0] = 1  # empty rows: one visible token
    slots = -(-(t.max_new_tokens + 1) // 8) * 8
    fields = shifted(ids_RxL, marks_RxL, slots if 2 * slots <= L else None)
    out = {"input_ids": ids_RxL, "attention_mask": mask_RxL, "labels": fields["labels"],
           "completion": fields["weights"], **({"logit_positions": fields["logit_positions"]}
                                               if "logit_positions" in fields else {})}
    ref = np.asarray(self._reference(self.reference_params(state), out))
    pad = lambda x: np.r_[x, np.zeros(R - len(x), np.float32)].astype(np.float32)  # noqa: E731
    std_B = rewards_BxG.std(1)
    return {**out, "ref_logps": ref, "advantages": pad(adv), "rewards": pad(rewards_BxG.reshape(-1)),
            "group_std": pad(np.repeat(std_B, G)), "weights": pad(np.ones(len(rows)))}

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
