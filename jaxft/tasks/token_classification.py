"""Token classification (NER): a tag per word in the BIO / IOB2 scheme, from a Dense head on every token.

Words are split into sub-tokens by the (fast) tokenizer; each word's tag is trained and predicted at its
first sub-token, the others weigh 0 (`weights_BxL`); packed rows carry the tags at their tokens' places.
Metrics are entity-level and exact: an entity is a (type, first word, last word) span, extracted
conlleval-style (an I-X not continuing an X entity starts one), matched on span and type; micro precision
/ recall / F1 over all entities, F1 per type, and token accuracy over the tagged sub-tokens.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxft.config import TaskConfig
from jaxft.data import packing
from jaxft.errors import JaxftError
from jaxft.tasks.base import (
  Examples,
  Task,
  column,
  dense_head,
  new_dense,
  nll,
  packed_tokens,
  pad_tokens,
  require_classes,
  require_columns,
  require_fast_tokenizer,
  where,
)


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
  """(type, start, end) spans, end exclusive, of a BIO / IOB2 tag sequence (conlleval's chunking)."""
  out, start, kind = [], None, None
  for i, tag in enumerate(list(tags) + ["O"]):
    prefix, _, tag_kind = tag.partition("-")
    if start is not None and (prefix != "I" or tag_kind != kind):  # O, B-, or I- of another type ends it
      out.append((kind, start, i))
      start = None
    if prefix in ("B", "I") and start is None:
      start, kind = i, tag_kind
  return out


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
  """Micro precision / recall / F1 over exact (type, span) matches, and F1 per entity type."""
  g = {(i,) + e for i, tags in enumerate(gold) for e in entities(tags)}
  p = {(i,) + e for i, tags in enumerate(pred) for e in entities(tags)}

  def prf(g, p):
    tp = len(g & p)
    precision, recall = tp / max(len(p), 1), tp / max(len(g), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)

  precision, recall, f1 = prf(g, p)
  out = {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}
  for kind in sorted({e[1] for e in g | p}):
    out[f"f1_{kind}"] = prf({e for e in g if e[1] == kind}, {e for e in p if e[1] == kind})[2]
  return out


@dataclasses.dataclass
class Config(TaskConfig):
  tokens_column: str = "tokens"  # the words
  tags_column: str = "tags"  # their BIO tags
  label_names: list[str] | None = None  # None: the source's tag names, else O and the sorted distinct train tags


def bio(tag: str) -> bool:
  return tag == "O" or tag[:2] in ("B-", "I-")


def token_where(records, i: int, k: int, split: str) -> str:
  """Where token k of record i was read: its own line in a CoNLL file, else the record's place and the token."""
  at = getattr(records[i], "token_origin", lambda k: None)(k)
  return at or f"{where(records, i, split)} (token {k + 1})"


class TokenClassification(Task):
  metrics = ("loss", "token_accuracy", "entity_precision", "entity_recall", "entity_f1")
  best_metric = "entity_f1"

  def __init__(self, cfg, backbone, source, log=print):
    super().__init__(cfg, backbone, source, log)
    t = cfg.task
    train = source.splits["train"]
    require_columns(train, (t.tokens_column, t.tags_column), "set task.tokens_column / task.tags_column")
    require_fast_tokenizer(backbone, "token_classification", "word ids")
    self.known = source.label_names.get(t.tags_column)  # ints in the records index these
    train_tags = self._tags(train, "train")
    tags = {t for ts in train_tags for t in ts}
    self.label_names = t.label_names or self.known or ["O"] * ("O" in tags) + sorted(tags - {"O"})
    bad = [t for t in self.label_names if not bio(t)]
    if bad:
      at = "task.label_names" if t.label_names else next(
        (token_where(train, i, k, "train") for i, ts in enumerate(train_tags) for k, tag in enumerate(ts)
         if not bio(tag)), f"the tag names of task.tags_column '{t.tags_column}'")
      raise JaxftError(f"{at}: tag {bad[0]!r} is not a BIO / IOB2 tag (O, B-TYPE, I-TYPE), which token_classification "
                       f"expects ({len(bad)} such tag(s): {bad[:3]})")
    require_classes(f"task.tags_column '{t.tags_column}'", self.label_names, tags,
                    lambda split: {t for ts in self._tags(source.splits.get(split, []), split) for t in ts}, log)
    self.pad_id = backbone.processor.pad_token_id or 0

  def _tags(self, records, split) -> list[list[str]]:
    tags = column(records, self.cfg.task.tags_column, split, (list,))
    return [[self.known[t] for t in ts] if self.known is not None else [str(t) for t in ts] for ts in tags]

  def encode(self, records, split):
    d, t = self.cfg.data, self.cfg.task
    words = [[str(w) for w in ws] for ws in column(records, t.tokens_column, split, (list,))]
    tags = self._tags(records, split)
    index = {t: i for i, t in enumerate(self.label_names)}
    stray = []  # (example, token) of each I-X that follows neither B-X nor I-X
    for i, (w, t) in enumerate(zip(words, tags)):
      if len(w) != len(t):
        raise JaxftError(f"{where(records, i, split)}: {len(w)} tokens but {len(t)} tags")
      for k, tag in enumerate(t):
        if tag not in index:
          raise JaxftError(f"{token_where(records, i, k, split)}: tag {tag!r} is not in the tag names {self.label_names}")
        if tag.startswith("I-") and (k == 0 or t[k - 1][2:] != tag[2:]):
          stray.append((i, k))
    if stray:
      self.log(f"{split}: {len(stray)} I- tag(s) follow no B- or I- of their type (the first: "
               f"{token_where(records, *stray[0], split)}); each starts an entity, as conlleval reads them")
    enc = self.backbone.processor(words, is_split_into_words=True, truncation=True, max_length=d.max_length,
                                  return_attention_mask=False, return_token_type_ids=False)
    ids, labels, first = [], [], []
    for i in range(len(records)):
      word_ids = enc.word_ids(i)
      first_of = {}  # word -> its first sub-token
      for pos, w in enumerate(word_ids):
        if w is not None and w not in first_of:
          first_of[w] = pos
      labels_L = np.full(len(word_ids), -1, np.int32)  # -1: not trained (special, later sub-tokens)
      for w, pos in first_of.items():
        labels_L[pos] = index[tags[i][w]]
      ids.append(np.asarray(enc["input_ids"][i], np.int32))
      labels.append(labels_L)
      first.append(np.array([first_of.get(w, -1) for w in range(len(words[i]))], np.int32))
    lost = sum(int((f < 0).sum()) for f in first)
    if lost:
      self.log(f"{split}: {lost} of {sum(map(len, words))} words have no sub-token within data.max_length="
               f"{d.max_length} (truncated or empty); they count as predicted O")
    return Examples(np.array([len(x) for x in ids]), {"ids": ids, "labels": labels},
                    meta={"tags": tags, "first": first})

  def collate(self, ex, idx, length, batch_size, epoch=None, seed=None):
    ids_BxL, mask_BxL = pad_tokens(ex.fields["ids"], idx, length, batch_size, self.pad_id)
    labels_BxL, _ = pad_tokens(ex.fields["labels"], idx, length, batch_size, -1)
    weights_BxL = (labels_BxL >= 0).astype(np.float32)
    return {"input_ids": ids_BxL, "attention_mask": mask_BxL, "token_type_ids": np.zeros_like(ids_BxL),
            "labels": np.maximum(labels_BxL, 0), "weights": weights_BxL}

  packs_eval = False  # its eval rows are per token, read back per example by finalize

  def cannot_pack(self):
    return None

  def collate_packed(self, ex, p):
    labels_RxL = packing.tokens(ex.fields["labels"], p, -1)[0]
    return {**packed_tokens(ex.fields["ids"], p, self.pad_id), "labels": np.maximum(labels_RxL, 0),
            "weights": (labels_RxL >= 0).astype(np.float32)}

  def init_head(self, rng):
    return new_dense(rng, self.backbone, len(self.label_names))

  def head(self, w, h_BxLxD, batch, train, rng):
    return dense_head(w, h_BxLxD.astype(jnp.float32), self.backbone.head_dropout, train, rng)

  def loss(self, logits_BxLxC, batch):
    w_BxL = batch["weights"]
    n = jnp.maximum(w_BxL.sum(), 1.0)
    correct_BxL = (jnp.argmax(logits_BxLxC, -1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(nll(logits_BxLxC, batch["labels"]) * w_BxL) / n, {"token_accuracy": jnp.sum(correct_BxL * w_BxL) / n}

  def eval_sums(self, logits_BxLxC, batch):
    w_BxL = batch["weights"]
    correct_BxL = (jnp.argmax(logits_BxLxC, -1) == batch["labels"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(nll(logits_BxLxC, batch["labels"]) * w_BxL), "count": w_BxL.sum(),
            "correct": jnp.sum(correct_BxL * w_BxL)}

  def eval_rows(self, logits_BxLxC, batch):
    return {"pred": jnp.argmax(logits_BxLxC, -1).astype(jnp.int32)}

  def finalize(self, sums, rows, ex):
    pred = []
    for pred_L, first in zip(rows["pred"], ex.meta["first"]):
      pred.append([self.label_names[pred_L[p]] if p >= 0 else "O" for p in first])
    return {"loss": float(sums["loss_sum"] / max(sums["count"], 1.0)),
            "token_accuracy": float(sums["correct"] / max(sums["count"], 1.0)),
            **entity_scores(ex.meta["tags"], pred)}

  def describe(self, metrics):
    per_type = "  ".join(f"{k[3:]} {v:.2f}" for k, v in metrics.items() if k.startswith("f1_"))
    return super().describe(metrics) + (f"  (F1 by type: {per_type})" if per_type else "")
