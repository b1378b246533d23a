"""Extractive question answering (SQuAD 1.1 / 2.0): the answer is a span of the context, predicted by a
Dense(2) head on every token as start and end logits (transformers' `qa_outputs`).

Records: {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}, an empty
answer list = unanswerable. Each question + context is tokenized into windows of data.max_length tokens,
consecutive windows sharing task.stride context tokens; an example is a window. A window is trained
toward its first gold answer's start / end tokens, or toward [CLS] (position 0) when the answer is not
entirely inside it or there is none. Decoding (host, per question over all its windows): the best span
of context tokens among the n_best top start and end logits of each window, end >= start, at most
task.max_answer_length tokens, score start + end logit, mapped back to the context by character offsets.
Where the training data has unanswerable questions, "" is predicted when the null score (the lowest
[CLS] start + end over the windows) beats the best span by more than `null_threshold`. Metrics: the
official SQuAD exact match and token F1 (max over the gold answers), in [0, 1].
"""
import collections
import dataclasses
import re
import string

import jax.numpy as jnp
import numpy as np

from jaxft.config import TaskConfig
from jaxft.errors import JaxftError
from jaxft.tasks.base import (
  Examples,
  Task,
  column,
  dense_head,
  new_dense,
  nll,
  pad_tokens,
  require_columns,
  require_fast_tokenizer,
  where,
)

NEG = -1e9  # the logit of padding tokens


def normalize_answer(s: str) -> str:
  """SQuAD's normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
  s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(pred: str, golds: list[str]) -> float:
  return max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)


def f1_score(pred: str, golds: list[str]) -> float:
  """Token F1 against the best gold answer; an empty side scores 1 only if both are empty."""
  def f1(p, g):
    if not p or not g:
      return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
      return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)
  p = normalize_answer(pred).split()
  return max(f1(p, normalize_answer(g).split()) for g in golds)


def squad_scores(golds: list[list[str]], preds: list[str]) -> dict:
  """Mean exact match and F1 over questions (SQuAD 2.0's script: gold answers that normalize to
  nothing are dropped, and a question with none left has the gold answer "")."""
  em = f1 = 0.0
  for gold, pred in zip(golds, preds):
    gold = [g for g in gold if normalize_answer(g)] or [""]
    em += exact_match(pred, gold)
    f1 += f1_score(pred, gold)
  n = max(len(preds), 1)
  return {"exact_match": em / n, "f1": f1 / n}


def best_span(start_L, end_L, context_L, n_best: int, max_answer_length: int):
  """(score, start, end) of the best span of context tokens among the n_best highest start and end
  logits: end >= start, at most max_answer_length tokens, score start + end logit; None if none."""
  k = min(n_best, int(context_L.sum()))
  if k == 0:
    return None
  start_L, end_L = np.where(context_L, start_L, -np.inf), np.where(context_L, end_L, -np.inf)
  s_K, e_K = np.argsort(-start_L, kind="stable")[:k], np.argsort(-end_L, kind="stable")[:k]
  length_KxK = e_K[None, :] - s_K[:, None] + 1
  ok_KxK = (length_KxK >= 1) & (length_KxK <= max_answer_length)
  if not ok_KxK.any():
    return None
  score_KxK = np.where(ok_KxK, start_L[s_K][:, None] + end_L[e_K][None, :], -np.inf)
  i, j = np.unravel_index(np.argmax(score_KxK), score_KxK.shape)
  return float(score_KxK[i, j]), int(s_K[i]), int(e_K[j])


def answers_of(record, where: str) -> list[tuple[str, int]]:
  """(text, start character) of each gold answer of a record."""
  try:
    a = record["answers"]
    return [(str(t), int(s)) for t, s in zip(a["text"], a["answer_start"], strict=True)]
  except (KeyError, TypeError, ValueError):
    raise JaxftError(f"{where}: expected answers {{\"text\": [...], \"answer_start\": [...]}} of equal length, "
                     f"got {str(record.get('answers'))[:80]}") from None


@dataclasses.dataclass
class Config(TaskConfig):
  """SQuAD records: question, context, answers {text, answer_start}."""
  stride: int = 128  # context tokens shared by consecutive windows
  max_answer_length: int = 30  # longest answer span decoded, in tokens
  on_bad_span: str = "error"  # an answer not found at its answer_start: error, or skip (drop it, with a count)

  def check(self):
    self.require(self.max_answer_length >= 1,
                 f"config key 'task.max_answer_length' must be >= 1, got {self.max_answer_length}")
    self.require(self.on_bad_span in ("error", "skip"),
                 f"config key 'task.on_bad_span' must be error or skip, got {self.on_bad_span!r}")


class QuestionAnswering(Task):
  head_key = "qa_outputs"
  metrics = ("loss", "exact_match", "f1")
  best_metric = "f1"
  n_best = 20  # top start and end logits per window searched for a span
  null_threshold = 0.0  # predict "" when null score - best span score > this (unanswerable data only)

  def __init__(self, cfg, backbone, source, log=print):
    super().__init__(cfg, backbone, source, log)
    d, tok = cfg.data, backbone.processor
    train = source.splits["train"]
    require_columns(train, ("question", "context", "answers"),
                    "question_answering reads SQuAD records: question, context, answers {text, answer_start}")
    require_fast_tokenizer(backbone, "question_answering", "character offsets")
    questions = [str(r.get("question", "")).lstrip() for records in source.splits.values() for r in records]
    longest = max(len(x) for x in tok(questions, add_special_tokens=False)["input_ids"])
    specials = tok.num_special_tokens_to_add(pair=True)
    room = d.max_length - longest - specials  # context tokens per window
    if room < 1:
      raise JaxftError(f"config key 'data.max_length' ({d.max_length}) leaves no room for context after the longest "
                       f"question ({longest} tokens) and {specials} special tokens")
    if not 0 <= cfg.task.stride < room:
      raise JaxftError(f"config key 'task.stride' must be >= 0 and < {room}, the context tokens a window holds "
                       f"(data.max_length={d.max_length} minus the longest question, {longest} tokens, and "
                       f"{specials} special tokens), got {cfg.task.stride}")
    self.has_null = any(not answers_of(r, where(train, i, "train")) for i, r in enumerate(train))
    self.pad_id = tok.pad_token_id or 0

  def checked(self, records, split: str) -> tuple[list, list, list]:
    """(records, the spans (text, start) of their answers found at their answer_start, every answer's text).
    Training: an answer whose text is not at its answer_start is an error naming the record
    (task.on_bad_span=error), or dropped with a count (skip: a question left with no answer is dropped, not read
    as unanswerable). Evaluation scores the answer texts, so it keeps them all: a misplaced one only has no span
    target (counted in a warning)."""
    contexts = column(records, "context", split)
    kept, spans, texts, bad, first = [], [], [], 0, None
    for i, (r, context) in enumerate(zip(records, contexts)):
      answers = answers_of(r, where(records, i, split))
      good = [(text, a) for text, a in answers if 0 <= a and context[a:a + len(text)] == text]
      if len(good) < len(answers):
        text, a = next(x for x in answers if x not in good)
        there = (f"the context there reads {context[a:a + len(text)][:40]!r}" if 0 <= a < len(context) else
                 f"the context has {len(context)} characters")
        first = first or f"{where(records, i, split)}: answer {text[:40]!r} is not at answer_start {a} ({there})"
        if split == "train" and self.cfg.task.on_bad_span == "error":
          raise JaxftError(f"{first}; fix the record, or set task.on_bad_span=skip to drop such answers")
        bad += len(answers) - len(good)
      if split != "train" or good or not answers:
        kept.append(r)
        spans.append(good)
        texts.append([t for t, _ in (answers if split != "train" else good)])
    if bad and split == "train":
      self.log(f"[bold red]warning:[/] {split}: dropped {bad} answer(s) not at their answer_start, and "
               f"{len(records) - len(kept)} question(s) left with none (task.on_bad_span=skip; the first: {first})")
    elif bad:
      self.log(f"[bold red]warning:[/] {split}: {bad} answer(s) not at their answer_start (the first: {first}); "
               "they are scored by their text, with no span target for the loss")
    return kept, spans, texts

  def encode(self, records, split):
    d, t = self.cfg.data, self.cfg.task
    records, golds, texts = self.checked(records, split)
    questions, contexts = column(records, "question", split), column(records, "context", split)
    enc = self.backbone.processor([q.lstrip() for q in questions], contexts,
                                  truncation="only_second", max_length=d.max_length, stride=t.stride,
                                  return_overflowing_tokens=True, return_offsets_mapping=True, padding=False,
                                  return_attention_mask=False)
    question_W = np.asarray(enc["overflow_to_sample_mapping"], np.int32)
    ids, types, offsets = [], [], []
    start_W, end_W = np.zeros(len(question_W), np.int32), np.zeros(len(question_W), np.int32)
    found = np.zeros(len(records), bool)
    for w, q in enumerate(question_W):
      ids.append(np.asarray(enc["input_ids"][w], np.int32))
      types.append(np.asarray(enc["token_type_ids"][w], np.int32) if "token_type_ids" in enc
                   else np.zeros_like(ids[-1]))
      off_Lx2 = np.asarray(enc["offset_mapping"][w], np.int32).reshape(-1, 2)
      off_Lx2[[s != 1 for s in enc.sequence_ids(w)]] = -1  # only context tokens map into the context
      offsets.append(off_Lx2)
      context_P = np.flatnonzero(off_Lx2[:, 0] >= 0)
      if golds[q] and len(context_P):
        text, a = golds[q][0]
        b = a + len(text)
        if off_Lx2[context_P[0], 0] <= a and off_Lx2[context_P[-1], 1] >= b:  # entirely inside the window
          start_W[w] = context_P[off_Lx2[context_P, 0] <= a][-1]
          end_W[w] = context_P[off_Lx2[context_P, 1] >= b][0]
          found[q] = True
    answerable = sum(map(bool, golds))
    lost = answerable - int(found.sum())
    self.log(f"{split}: {len(records)} questions in {len(ids)} windows" +
             (f"; {lost} of {answerable} answers fit in no window of data.max_length={d.max_length} "
              f"(those windows target [CLS])" if lost else ""))
    return Examples(np.array([len(x) for x in ids]), {"ids": ids, "types": types, "start": start_W, "end": end_W},
                    meta={"question": question_W, "offsets": offsets, "context": contexts,
                          "answers": texts,
                          "id": [str(r.get("id", i)) for i, r in enumerate(records)]})

  def collate(self, ex, idx, length, batch_size, epoch=None, seed=None):
    ids_BxL, mask_BxL = pad_tokens(ex.fields["ids"], idx, length, batch_size, self.pad_id)
    types_BxL, _ = pad_tokens(ex.fields["types"], idx, length, batch_size, 0)
    start_B, end_B, weights_B = (np.zeros((batch_size,), t) for t in (np.int32, np.int32, np.float32))
    start_B[:len(idx)], end_B[:len(idx)], weights_B[:len(idx)] = ex.fields["start"][idx], ex.fields["end"][idx], 1.0
    return {"input_ids": ids_BxL, "attention_mask": mask_BxL, "token_type_ids": types_BxL,
            "start": start_B, "end": end_B, "weights": weights_B}

  def init_head(self, rng):
    return new_dense(rng, self.backbone, 2)

  def head(self, w, h_BxLxD, batch, train, rng):
    logits_BxLx2 = dense_head(w, h_BxLxD.astype(jnp.float32), self.backbone.head_dropout, train, rng)
    logits_BxLx2 = jnp.where(batch["attention_mask"][..., None] > 0, logits_BxLx2, NEG)
    return logits_BxLx2[..., 0], logits_BxLx2[..., 1]

  def _nll(self, outputs, batch):
    """Per window: (CE(start) + CE(end)) / 2, and whether both argmaxes are right."""
    nll_B, right_B = 0.0, True
    for logits_BxL, gold_B in zip(outputs, (batch["start"], batch["end"])):
      nll_B = nll_B + nll(logits_BxL, gold_B) / 2
      right_B = right_B & (jnp.argmax(logits_BxL, -1) == gold_B)
    return nll_B, right_B.astype(jnp.float32)

  def loss(self, outputs, batch):
    w_B = batch["weights"]
    n = jnp.maximum(w_B.sum(), 1.0)
    nll_B, right_B = self._nll(outputs, batch)
    return jnp.sum(nll_B * w_B) / n, {"span_accuracy": jnp.sum(right_B * w_B) / n}

  def eval_sums(self, outputs, batch):
    w_B = batch["weights"]
    return {"loss_sum": jnp.sum(self._nll(outputs, batch)[0] * w_B), "count": w_B.sum()}

  def eval_rows(self, outputs, batch):
    return {"start": outputs[0].astype(jnp.float32), "end": outputs[1].astype(jnp.float32)}

  def predict(self, rows, ex) -> list[str]:
    """The answer text of every question, from the start / end logits of its windows."""
    m, n = ex.meta, len(ex.meta["context"])
    best, null = [(-np.inf, "")] * n, np.full(n, np.inf)
    for w, q in enumerate(m["question"]):
      off_Lx2 = m["offsets"][w]
      start_L, end_L = (np.asarray(rows[k][w][:len(off_Lx2)], np.float64) for k in ("start", "end"))
      null[q] = min(null[q], start_L[0] + end_L[0])
      span = best_span(start_L, end_L, off_Lx2[:, 0] >= 0, self.n_best, self.cfg.task.max_answer_length)
      if span is not None and span[0] > best[q][0]:
        best[q] = (span[0], m["context"][q][off_Lx2[span[1], 0]:off_Lx2[span[2], 1]])
    return ["" if self.has_null and null[q] - score > self.null_threshold else text
            for q, (score, text) in enumerate(best)]

  def finalize(self, sums, rows, ex):
    return {"loss": float(sums["loss_sum"] / max(sums["count"], 1.0)),
            **squad_scores(ex.meta["answers"], self.predict(rows, ex))}
