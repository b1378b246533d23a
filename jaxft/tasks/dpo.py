"""Direct preference optimisation (DPO; Rafailov et al. 2023) of a causal LM on preference pairs, and IPO
(Azar et al. 2023) as its `task.loss: ipo`.

Records hold task.prompt_column (text, or chat messages) and task.chosen_column / task.rejected_column (text:
the assistant's answer; or messages: the turns that follow the prompt, or, with no prompt, whole conversations
ending with an assistant turn). Each side is rendered as SFT renders a conversation (the tokenizer's chat
template) and its last assistant turn is what is scored: log pi(y | x), summed over its tokens.

A pair is one segment of a row, a tree: the tokens both sides share (the prompt, up to where the two renderings
first differ) once, then the chosen side's remaining tokens, then the rejected side's (`branch_ids` 1 and 2:
each sees the shared tokens and its own, positions of both continuing from the shared end). The prompt's
forward pass runs once for both sides (a movie review and a one-word answer: half the tokens of two rows),
and both sides are always in the same batch, micro-batch and device. Logits are computed at the scored
positions only (`logit_positions`): the shared last token's predicts the first answer token of either side, so
it is listed for each. Packed (data.pack), several pairs share a row (slot k's sides score codes 2k + 1 and
2k + 2). Each side is cut at half of data.max_length, so a pair always fits a row.

The reference model costs no second copy of the weights: its log-probabilities of every pair are computed
once, when the data is encoded, with the model as loaded (one forward pass over every split, logged with its
time), and travel with the examples. With LoRA that model is the base with the adapters off; the policy
starts equal to it.

Loss, with h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)):
  sigmoid (DPO): -log sigmoid(beta h);   ipo: (h' - 1 / (2 beta))^2, h' of per-token mean log-probabilities;
  plus, with task.rpo_alpha (RPO, Pang et al. 2024; TRL's rpo_alpha), alpha times the chosen answer's mean NLL.
Metrics: loss, reward accuracy (the share of pairs with h > 0), reward margin (beta h), and the exact match of
the answer generated greedily from the prompt against the chosen answer (as SFT's).
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import TaskConfig
from jaxft.data import batching, packing
from jaxft.errors import JaxftError
from jaxft.tasks.base import Examples, nll, where
from jaxft.tasks.causal_lm import Generation, require_targets, scored_bound
from jaxft.tasks.sft import SFT, is_conversation

LOSSES = ("sigmoid", "ipo")


@dataclasses.dataclass
class Config(Generation, TaskConfig):
  """Preference pairs: a prompt, the answer preferred (chosen) and the one not (rejected)."""
  prompt_column: str = "prompt"
  chosen_column: str = "chosen"
  rejected_column: str = "rejected"
  beta: float = 0.1  # how far from the reference the policy may move: the KL penalty's weight
  loss: str = "sigmoid"  # sigmoid (DPO) | ipo
  rpo_alpha: float = 0.0  # RPO (Pang et al. 2024): plus this times the chosen answer's mean token NLL
  eval_examples: int | None = 200  # generate answers for this many examples of each evaluated split; None: all

  def check(self) -> None:
    self.check_generation()
    self.require(self.beta > 0, f"config key 'task.beta' must be > 0, got {self.beta}")
    self.require(self.rpo_alpha >= 0, f"config key 'task.rpo_alpha' must be >= 0, got {self.rpo_alpha}")
    self.require(self.loss in LOSSES, f"config key 'task.loss' must be one of {', '.join(LOSSES)}, got {self.loss!r}")
    self.require(self.eval_examples is None or self.eval_examples > 0,
                 f"config key 'task.eval_examples' must be > 0 (or null: all), got {self.eval_examples}")


def pair_logps(logits_BxPxV, batch):
  """([B, K, 2] summed log-probabilities of each slot's chosen (0) and rejected (1) tokens, [B, K, 2] their
  token counts): batch["codes"] [B, P] names the side each scored position predicts (2k + 1, 2k + 2; 0: none)."""
  B, K = batch["weights"].shape
  logp_BxP = -nll(logits_BxPxV, batch["labels"])
  member_BxPxC = (batch["codes"][..., None] == jnp.arange(1, 2 * K + 1)).astype(jnp.float32)
  sums_BxC = jnp.einsum("bp,bpc->bc", logp_BxP, member_BxPxC)
  return sums_BxC.reshape(B, K, 2), member_BxPxC.sum(1).reshape(B, K, 2)


def preference(logps_BxKx2, counts_BxKx2, reference_BxKx2, beta: float, loss: str, rpo_alpha: float = 0.0):
  """(per-pair loss [B, K], h [B, K]): the policy's log-ratio margin over the reference's, and its loss (plus
  rpo_alpha times the chosen side's mean token NLL)."""
  h_BxK = (logps_BxKx2[..., 0] - reference_BxKx2[..., 0]) - (logps_BxKx2[..., 1] - reference_BxKx2[..., 1])
  n_BxKx2 = jnp.maximum(counts_BxKx2, 1.0)
  nll_BxK = -logps_BxKx2[..., 0] / n_BxKx2[..., 0]
  if loss == "sigmoid":
    return -jax.nn.log_sigmoid(beta * h_BxK) + rpo_alpha * nll_BxK, h_BxK
  mean_h_BxK = ((logps_BxKx2[..., 0] - reference_BxKx2[..., 0]) / n_BxKx2[..., 0]
                - (logps_BxKx2[..., 1] - reference_BxKx2[..., 1]) / n_BxKx2[..., 1])
  return (mean_h_BxK - 1.0 / (2.0 * beta)) ** 2 + rpo_alpha * nll_BxK, h_BxK


def tree(c_ids, c_targets, r_ids, r_targets):
  """One pair as a tree (ids, branch, positions, scored [M, 3]): the shared tokens, then the chosen side's
  rest (branch 1), then the rejected side's (branch 2); scored lists (the position whose logits predict the
  token, the token, side 1 or 2) for every trained token of either side."""
  n = min(len(c_ids), len(r_ids))
  shared = int(np.argmin(c_ids[:n] == r_ids[:n])) if np.any(c_ids[:n] != r_ids[:n]) else n
  ids = np.concatenate([c_ids, r_ids[shared:]])
  branch = np.r_[np.zeros(shared, np.int32), np.full(len(c_ids) - shared, 1, np.int32),
                 np.full(len(r_ids) - shared, 2, np.int32)]
  positions = np.r_[np.arange(len(c_ids)), np.arange(shared, len(r_ids))].astype(np.int32)
  c_at = np.flatnonzero(c_targets[1:])  # token j + 1 is predicted at position j
  r_at = np.flatnonzero(r_targets[1:])
  r_row = np.where(r_at < shared, r_at, r_at - shared + len(c_ids))  # where the rejected side's positions are
  scored = np.concatenate([np.stack([c_at, c_ids[c_at + 1], np.full_like(c_at, 1)], 1),
                           np.stack([r_row, r_ids[r_at + 1], np.full_like(r_at, 2)], 1)]).astype(np.int32)
  return ids.astype(np.int32), branch, positions, scored


class DPO(SFT):
  metrics = ("loss", "reward_accuracy", "reward_margin", "exact_match")
  best_metric = "loss"
  lower_is_better = ("loss",)
  train_metrics = ("reward_accuracy", "reward_margin")

  def __init__(self, cfg, backbone, source, log=print):
    super().__init__(cfg, backbone, source, log)
    if not backbone.packs:
      raise JaxftError(f"task.name dpo puts a pair's two sides in one row as two segments, and {backbone.name} "
                       f"takes no segment ids")

  def _sides(self, records, split) -> tuple[list, list]:
    """(chosen conversations, rejected conversations): each the prompt's messages and its side's."""
    t = self.cfg.task
    chosen, rejected = [], []
    for i, r in enumerate(records):
      origin = where(records, i, split)
      if t.chosen_column not in r or t.rejected_column not in r:
        raise JaxftError(f"{origin}: no '{t.chosen_column}' / '{t.rejected_column}' (keys: {', '.join(map(str, r))}); "
                         f"set task.chosen_column / task.rejected_column")
      prompt = r.get(t.prompt_column, [])
      prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
      for side, out in ((t.chosen_column, chosen), (t.rejected_column, rejected)):
        answer = r[side]
        answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
        msgs = prompt + answer if isinstance(prompt, list) and isinstance(answer, list) else None
        if not is_conversation(msgs):
          raise JaxftError(f"{origin}: '{t.prompt_column}' + '{side}' must be text, or {{role, content}} messages "
                           f"ending with an assistant message")
        out.append(msgs)
    return chosen, rejected

  def encode(self, records, split):
    d = self.cfg.data
    origins = [where(records, i, split) for i in range(len(records))]
    chosen, rejected = self._sides(records, split)
    half = d.max_length // 2
    (c_ids, c_t, prompts, c_cut), (r_ids, r_t, _, r_cut) = (self.tokenized(convs, origins, half, last_turn=True)
                                                            for convs in (chosen, rejected))
    for side_targets in (c_t, r_t):
      require_targets(Examples(np.zeros(len(records)), {"targets": side_targets}), records, split,
                      f"its chosen or rejected answer starts past half of data.max_length={d.max_length}")
    trees = [tree(*sides) for sides in zip(c_ids, c_t, r_ids, r_t, strict=True)]
    ex = Examples(np.array([len(ids) for ids, *_ in trees]),
                  {name: [t[n] for t in trees] for n, name in enumerate(("ids", "branch", "positions", "scored"))},
                  meta={"prompts": prompts, "answers": [c[-1]["content"] for c in chosen]})
    ex.fields["reference"] = self.reference(ex, split)
    shared = sum(len(c) + len(r) for c, r in zip(c_ids, r_ids, strict=True)) - int(ex.lengths.sum())
    self.log(f"{split}: {len(ex):,} preference pairs, {int(ex.lengths.sum()):,} tokens ({shared:,} shared by both "
             f"sides, run once)" + (f"; {c_cut + r_cut} sides cut at half of data.max_length={d.max_length}"
                                    if c_cut + r_cut else ""))
    return ex

  def reference(self, ex: Examples, split: str) -> np.ndarray:
    """[N, 2] the loaded model's summed log-probabilities of each pair's chosen and rejected answers (zeros
    where the model has shapes only: model.weights=shapes)."""
    bb = self.backbone
    if not len(ex) or self.cfg.model.weights == "shapes":
      return np.zeros((len(ex), 2), np.float32)
    logps = jax.jit(lambda params, batch: pair_logps(bb.apply(params, batch, False, None, bb.state)[0]["logits"],
                                                     batch)[0])
    size, start = self.cfg.train.eval_batch_size, time.time()
    out = np.zeros((len(ex), 2), np.float32)
    order = np.argsort(ex.lengths, kind="stable")  # similar lengths together: few padded tokens, few shapes
    buckets = batching.length_buckets(self.cfg.data)
    for s in range(0, len(ex), size):
      idx = order[s:s + size]
      length = batching.bucket(int(ex.lengths[idx].max()), buckets)
      out[idx] = np.asarray(logps(bb.params, self.collate(ex, idx, length, size)))[:len(idx), 0]
    self.log(f"{split}: the reference's log-probabilities of {len(ex):,} pairs in {time.time() - start:.1f} s "
             f"(one forward pass, kept with the examples)")
    return out

  def collate(self, ex, idx, length, batch_size, epoch=None, seed=None):
    rows = [[(int(i), 0, 0)] for i in idx] + [[] for _ in range(batch_size - len(idx))]
    return self.collate_packed(ex, packing.Plan(rows, length, 1))

  def collate_packed(self, ex, p):
    """Rows of pairs, slot k's tree its segment k + 1; the logits at each scored position (padded with code 0
    to a bound on any row of the split, rounded to 8: one shape per row length)."""
    slots = scored_bound(ex, p.slots, lambda ex, i: len(ex.fields["scored"][i]))
    ids_RxL = np.full((p.num_rows, p.length), self.pad_id, np.int32)
    segments_RxL, branches_RxL, positions_RxL = (np.zeros((p.num_rows, p.length), np.int32) for _ in range(3))
    at_RxP, labels_RxP, codes_RxP = (np.zeros((p.num_rows, slots), np.int32) for _ in range(3))
    for r, row in enumerate(p.rows):
      n = 0
      for i, k, offset in row:
        f = {name: ex.fields[name][i] for name in ("ids", "branch", "positions", "scored")}
        end, m = offset + len(f["ids"]), len(f["scored"])
        ids_RxL[r, offset:end], branches_RxL[r, offset:end] = f["ids"], f["branch"]
        segments_RxL[r, offset:end], positions_RxL[r, offset:end] = k + 1, f["positions"]
        at_RxP[r, n:n + m] = offset + f["scored"][:, 0]
        labels_RxP[r, n:n + m], codes_RxP[r, n:n + m] = f["scored"][:, 1], 2 * k + f["scored"][:, 2]
        n += m
    index_RxK = p.index
    return {"input_ids": ids_RxL, "attention_mask": (segments_RxL > 0).astype(np.int32), "position_ids": positions_RxL,
            "segment_ids": segments_RxL, "branch_ids": branches_RxL, "logit_positions": at_RxP, "labels": labels_RxP,
            "codes": codes_RxP, "weights": (index_RxK >= 0).astype(np.float32),
            "reference": packing.per_example(ex.fields.get("reference", np.zeros((len(ex), 2), np.float32)),
                                             index_RxK)}

  def synthetic(self, batch, rng):
    """Random tokens where the batch has tokens; its pairs, scored positions and references kept (bench)."""
    batch["input_ids"] = np.where(batch["attention_mask"] > 0, rng.integers(5, self.backbone.processor.vocab_size,
                                                                            batch["input_ids"].shape), self.pad_id)
    return batch

  def trained_tokens(self, batch):
    """The answers' tokens, scored on both sides of each pair."""
    return float((np.asarray(batch["codes"]) > 0).sum())

  def _terms(self, logits_BxPxV, batch):
    t = self.cfg.task
    logps, counts = pair_logps(logits_BxPxV, batch)
    losses_BxK, h_BxK = preference(logps, counts, batch["reference"], t.beta, t.loss, t.rpo_alpha)
    w_BxK = batch["weights"]
    return {"loss_sum": jnp.sum(losses_BxK * w_BxK), "count": jnp.sum(w_BxK),
            "correct": jnp.sum((h_BxK > 0) * w_BxK), "margin_sum": jnp.sum(t.beta * h_BxK * w_BxK)}

  def loss(self, logits_BxPxV, batch):
    s = self._terms(logits_BxPxV, batch)
    n = jnp.maximum(s["count"], 1.0)
    return s["loss_sum"] / n, {"reward_accuracy": s["correct"] / n, "reward_margin": s["margin_sum"] / n}

  def eval_sums(self, logits_BxPxV, batch):
    return self._terms(logits_BxPxV, batch)

  def finalize(self, sums, rows, ex):
    n = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / n, "reward_accuracy": float(sums["correct"]) / n,
            "reward_margin": float(sums["margin_sum"]) / n}

  def batch_layout(self, pack, buckets):
    return (f"preference pairs packed into rows of {self.cfg.data.max_length}" if pack else
            f"one preference pair a row, length buckets {buckets}")
