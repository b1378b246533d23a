"""Causal language modelling (continued pretraining): next-token prediction on plain text, with the model's
own LM head (no new params).

Each document of task.text_column is tokenized and ends with the EOS token. Packed (data.pack, the
default where the model takes segment ids), a document is an example, cut into windows of data.max_length
tokens when longer, and examples share rows without attending across documents. Unpacked
(data.pack=false), documents are concatenated into one token stream cut into rows of data.max_length
(Hugging Face's run_clm.py): attention crosses document boundaries.

An example's `targets` mark the tokens that are predicted (the first token of an example never is: nothing
precedes it); position t of a row predicts token t + 1 and weighs targets[t + 1] (`weights_BxL`). The loss
is the mean over those tokens of the whole batch (micro-batches and devices weighted by their token counts,
step.py). Metrics: loss (nats per predicted token), perplexity exp(loss), next-token accuracy.
"""
import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxft.config import TaskConfig
from jaxft.data import packing
from jaxft.errors import JaxftError
from jaxft.tasks.base import Examples, Task, column, nll, packed_tokens, pad_tokens, where


def shifted(ids_BxL, targets_BxL, slots: int | None = None) -> dict:
  """labels[t] = ids[t + 1] and weights[t] = targets[t + 1] (0 at the last position). With `slots` P, only
  each row's trained positions are kept, first and in order, padded with weight 0: `logit_positions`
  [B, P] says where they are, and the model computes logits there only (labels and weights [B, P])."""
  labels_BxL = np.zeros_like(ids_BxL)
  labels_BxL[:, :-1] = ids_BxL[:, 1:]
  weights_BxL = np.zeros(ids_BxL.shape, np.float32)
  weights_BxL[:, :-1] = targets_BxL[:, 1:]
  if slots is None:
    return {"labels": labels_BxL, "weights": weights_BxL}
  assert (weights_BxL > 0).sum(1).max() <= slots, "a row trains more tokens than its logit_positions bound"
  positions_BxP = np.argsort(weights_BxL == 0, axis=1, kind="stable")[:, :slots].astype(np.int32)
  take = lambda x: np.take_along_axis(x, positions_BxP, axis=1)  # noqa: E731
  return {"labels": take(labels_BxL), "weights": take(weights_BxL), "logit_positions": positions_BxP}


def scored_bound(ex: Examples, examples_per_row: int, count=lambda ex, i: int(ex.fields["targets"][i].sum())) -> int:
  """A bound on the scored positions of any row holding up to `examples_per_row` of the split's examples
  (count(ex, i): example i's), rounded up to 8: one shape for every row of a length."""
  if "scored_desc" not in ex.meta:
    ex.meta["scored_desc"] = np.sort([count(ex, i) for i in range(len(ex))])[::-1]
  return -(-int(ex.meta["scored_desc"][:examples_per_row].sum()) // 8) * 8


def logit_slots(ex: Examples, length: int, examples_per_row: int = 1) -> int | None:
  """How many positions of a row need logits: `scored_bound` of its trained tokens; None (all of them) where
  that would be more than half the row. SFT trains a few response tokens per example, and logits over a
  vocabulary of 50k at every prompt position cost a fifth of a small model's step."""
  slots = scored_bound(ex, examples_per_row)
  return slots if 2 * slots <= length else None


def lm_sums(logits_BxLxV, batch) -> dict:
  """Summed next-token NLL, predicted-token count and correct predictions of a batch."""
  w_BxL = batch["weights"]
  correct_BxL = (jnp.argmax(logits_BxLxV, -1) == batch["labels"]).astype(jnp.float32)
  return {"loss_sum": jnp.sum(nll(logits_BxLxV, batch["labels"]) * w_BxL), "count": jnp.sum(w_BxL),
          "correct": jnp.sum(correct_BxL * w_BxL)}


@dataclasses.dataclass
class Generation:
  """How a causal LM generates (`jaxft generate`; sft: the answers it scores in evaluation)."""
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0: greedy; else sampled, within the top_p nucleus
  top_p: float = 1.0

  def check_generation(self) -> None:
    TaskConfig.require(self.max_new_tokens > 0 and self.temperature >= 0 and 0 < self.top_p <= 1,
                       f"config keys 'task.max_new_tokens' > 0, 'task.temperature' >= 0, 'task.top_p' in (0, 1]; "
                       f"got {self.max_new_tokens}, {self.temperature}, {self.top_p}")


@dataclasses.dataclass
class Config(Generation, TaskConfig):
  text_column: str = "text"  # the documents to model

  def check(self) -> None:
    self.check_generation()


class CausalLM(Task):
  head_key = None  # the LM head is the model's own (tied or not): nothing new is added
  metrics = ("loss", "perplexity", "token_accuracy")
  best_metric = "loss"
  lower_is_better = ("loss", "perplexity")

  def synthetic(self, batch: dict, rng: np.random.Generator) -> dict:
    """Random tokens, every next one predicted."""
    batch = super().synthetic(batch, rng)
    batch.pop("logit_positions", None)
    batch["labels"] = np.roll(batch["input_ids"], -1, axis=1)
    batch["weights"] = np.ones(batch["input_ids"].shape, np.float32)
    batch["weights"][:, -1] = 0
    return batch

  def __init__(self, cfg, backbone, source, log=print):
    super().__init__(cfg, backbone, source, log)
    if backbone.new_cache is None:
      raise JaxftError(f"task.name {cfg.task.name} needs a causal LM (jaxft's llama family); {backbone.name} "
                       f"is a {getattr(backbone.config, 'model_type', type(backbone.config).__name__)} encoder")
    tok = backbone.processor
    self.eos_id = tok.eos_token_id
    if self.eos_id is None:
      raise JaxftError(f"the tokenizer of {backbone.name} has no EOS token, which ends each document")
    self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id

  @property
  def head_regex(self):
    return None

  def init_head(self, rng):
    return None

  def features(self, backbone_out, batch):
    return backbone_out["logits"]

  def head(self, head_params, logits_BxLxV, batch, train, rng):
    return logits_BxLxV

  def encode(self, records, split):
    d, t = self.cfg.data, self.cfg.task
    texts = column(records, t.text_column, split)
    docs = [np.asarray(ids + [self.eos_id], np.int32)
            for ids in self.backbone.processor(texts, add_special_tokens=True)["input_ids"]]
    concatenate = d.pack is False or not self.backbone.packs
    if concatenate:  # one stream, cut into rows
      stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
      chunks = [stream[s:s + d.max_length] for s in range(0, len(stream), d.max_length)]
    else:  # every document on its own, long ones in windows
      chunks = [doc[s:s + d.max_length] for doc in docs for s in range(0, len(doc), d.max_length)]
    chunks = [c for c in chunks if len(c) > 1]  # a 1-token window predicts nothing
    if not chunks:
      raise JaxftError(f"{split}: task.text_column '{t.text_column}' holds no text to predict")
    targets = [np.r_[0, np.ones(len(c) - 1, np.int32)].astype(np.int32) for c in chunks]
    tokens = sum(len(c) for c in chunks)
    self.log(f"{split}: {len(texts):,} documents, {tokens:,} tokens in {len(chunks):,} "
             f"{'rows of a concatenated stream' if concatenate else 'windows'} of <= {d.max_length}")
    return Examples(np.array([len(c) for c in chunks]), {"ids": chunks, "targets": targets})

  def collate(self, ex, idx, length, batch_size, epoch=None, seed=None):
    ids_BxL, mask_BxL = pad_tokens(ex.fields["ids"], idx, length, batch_size, self.pad_id)
    targets_BxL, _ = pad_tokens(ex.fields["targets"], idx, length, batch_size, 0)
    return {"input_ids": ids_BxL, "attention_mask": mask_BxL,
            **shifted(ids_BxL, targets_BxL, logit_slots(ex, length))}

  def cannot_pack(self):
    return None

  def collate_packed(self, ex, p):
    fields = packed_tokens(ex.fields["ids"], p, self.pad_id)
    fields.pop("token_type_ids")
    targets_RxL = packing.tokens(ex.fields["targets"], p, 0)[0]
    return {**fields, **shifted(fields["input_ids"], targets_RxL, logit_slots(ex, p.length, p.slots))}

  def batch_layout(self, pack, buckets):
    return (f"documents packed into rows of {self.cfg.data.max_length}" if pack else
            f"a concatenated token stream in rows of {self.cfg.data.max_length}")

  def loss(self, logits_BxLxV, batch):
    s = lm_sums(logits_BxLxV, batch)
    n = jnp.maximum(s["count"], 1.0)
    return s["loss_sum"] / n, {"token_accuracy": s["correct"] / n}

  def eval_sums(self, logits_BxLxV, batch):
    return lm_sums(logits_BxLxV, batch)

  def finalize(self, sums, rows, ex):
    loss = float(sums["loss_sum"] / max(float(sums["count"]), 1.0))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": float(sums["correct"] / max(float(sums["count"]), 1.0))}


def require_targets(ex: Examples, records, split: str, why: str) -> None:
  """Every example must have a token to predict: an example without one is an error naming it."""
  for i, t in enumerate(ex.fields["targets"]):
    if not np.any(t):
      raise JaxftError(f"{where(records, i, split)}: no token of it is trained ({why})")
