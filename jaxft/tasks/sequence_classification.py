"""Text classification: one label per text, from a pooled encoding and a new Dense head.

Pooling (task.pooling): `mean` (masked mean over tokens: what sentence-transformers checkpoints are
trained for), `cls` (the backbone's pooler output, or its first token where it has no pooler), or `auto`
(the checkpoint's own). Packed rows (data/packing.py) mean-pool each example's own tokens, and labels,
logits and weights are [R, K] by slot instead of [B]. Metrics: loss, accuracy, macro-F1 (classes present
in the split). Training data with one class only is an error, or a warning where the label names list the
classes validation / test bring (tasks.base.require_classes).
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft import hparams
from jaxft.config import TaskConfig
from jaxft.data import packing
from jaxft.tasks.base import (
  ClassLabels,
  Examples,
  Task,
  column,
  dense_head,
  new_dense,
  nll,
  packed_tokens,
  pad_tokens,
  require_columns,
)


@dataclasses.dataclass
class Config(TaskConfig):
  text_column: str = "text"
  label_column: str = "label"
  label_names: list[str] | None = None  # None: the source's class names, else sorted distinct train labels
  pooling: str = "auto"  # mean | cls (pooler or first token) | auto (the checkpoint's)
  label_smoothing: float = 0.0  # training's cross-entropy against (1 - e) one-hot + e / classes

  def check(self):
    self.require(self.pooling in ("auto", "cls", "mean"),
                 f"config key 'task.pooling' must be auto, cls or mean, got {self.pooling!r}")
    self.require(0 <= self.label_smoothing < 1,
                 f"config key 'task.label_smoothing' must be in [0, 1), got {self.label_smoothing}")


def tokenize(backbone, texts: list[str], max_length: int) -> list[np.ndarray]:
  """Each text's token ids (int32), truncated to max_length, special tokens included."""
  out = backbone.processor(texts, truncation=True, max_length=max_length, padding=False,
                           return_attention_mask=False, return_token_type_ids=False)
  return [np.asarray(x, np.int32) for x in out["input_ids"]]


def cross_entropy(logits_BxC, labels_B, weights_B):
  """Weighted mean cross-entropy, and the per-example negative log-likelihood (any leading dims: [B] or
  packed [R, K])."""
  nll_B = nll(logits_BxC, labels_B)
  loss = jnp.sum(nll_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)
  return loss, nll_B


def smoothed_cross_entropy(logits_BxC, labels_B, weights_B, smoothing):
  """Weighted mean cross-entropy against (1 - smoothing) one-hot + smoothing / classes (task.label_smoothing,
  a sweep replica's own in its hparams.scope); plain `cross_entropy`'s where it is a 0 of the config."""
  smoothing = hparams.value("task.label_smoothing", smoothing)
  if not hparams.swept("task.label_smoothing") and smoothing == 0:
    return cross_entropy(logits_BxC, labels_B, weights_B)[0]
  targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxC.shape[-1]), smoothing)
  loss_B = optax.softmax_cross_entropy(logits_BxC.astype(jnp.float32), targets_BxC)
  return jnp.sum(loss_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)


def accuracy(logits_BxC, labels_B, weights_B):
  """Weighted top-1 accuracy (any leading dims)."""
  correct_B = (jnp.argmax(logits_BxC, -1) == labels_B).astype(jnp.float32)
  return jnp.sum(correct_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)


def confusion_sums(logits_BxC, labels_B, weights_B) -> dict:
  """The eval sums from_confusion reads: summed NLL, weight and the [true, pred] confusion counts."""
  _, nll_B = cross_entropy(logits_BxC, labels_B, weights_B)
  C = logits_BxC.shape[-1]
  onehot_true_BxC = (jax.nn.one_hot(labels_B, C) * weights_B[..., None]).reshape(-1, C)
  onehot_pred_BxC = jax.nn.one_hot(jnp.argmax(logits_BxC, -1), C).reshape(-1, C)
  return {"loss_sum": jnp.sum(nll_B * weights_B), "count": jnp.sum(weights_B),
          "confusion": onehot_true_BxC.T @ onehot_pred_BxC}


def from_confusion(confusion, loss_sum: float, count: float) -> dict:
  """loss, accuracy and macro-F1 from a [true, pred] confusion matrix of counts."""
  c = np.asarray(confusion, np.float64)
  tp = np.diag(c)
  precision = np.divide(tp, c.sum(0), out=np.zeros_like(tp), where=c.sum(0) > 0)
  recall = np.divide(tp, c.sum(1), out=np.zeros_like(tp), where=c.sum(1) > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                 where=(precision + recall) > 0)
  present = c.sum(1) > 0  # classes absent from the split do not count in the macro average
  return {"loss": float(loss_sum / max(count, 1.0)), "accuracy": float(tp.sum() / max(c.sum(), 1.0)),
          "macro_f1": float(f1[present].mean()) if present.any() else 0.0}


class SequenceClassification(Task):
  metrics = ("loss", "accuracy", "macro_f1")
  best_metric = "accuracy"
  cacheable = True

  @classmethod
  def needs_pooler(cls, cfg, checkpoint_pooling):
    return (checkpoint_pooling if cfg.task.pooling == "auto" else cfg.task.pooling) == "cls"

  def __init__(self, cfg, backbone, source, log=print):
    super().__init__(cfg, backbone, source, log)
    t = cfg.task
    self.pooling = backbone.pooling if t.pooling == "auto" else t.pooling
    require_columns(source.splits["train"], (t.text_column, t.label_column), "set task.text_column / task.label_column")
    self.classes = ClassLabels(cfg, source, log)
    self.label_names = self.classes.names

  @property
  def pad_id(self) -> int:
    return self.backbone.processor.pad_token_id or 0

  def encode(self, records, split):
    ids = tokenize(self.backbone, column(records, self.cfg.task.text_column, split), self.cfg.data.max_length)
    labels = self.classes.index(self.label_names, records, split)
    return Examples(np.array([len(x) for x in ids]), {"ids": ids, "labels": labels})

  def collate_tokens(self, ex, idx, length, batch_size) -> dict:
    """The backbone's fields of examples `idx`, padded, and their weights (padding rows weigh 0)."""
    ids_BxL, mask_BxL = pad_tokens(ex.fields["ids"], idx, length, batch_size, self.pad_id)
    weights_B = np.zeros((batch_size,), np.float32)
    weights_B[:len(idx)] = 1.0
    return {"input_ids": ids_BxL, "attention_mask": mask_BxL, "token_type_ids": np.zeros_like(ids_BxL),
            "weights": weights_B}

  def collate(self, ex, idx, length, batch_size, epoch=None, seed=None):
    labels_B = np.zeros((batch_size,), np.int32)
    labels_B[:len(idx)] = ex.fields["labels"][idx]
    return {**self.collate_tokens(ex, idx, length, batch_size), "labels": labels_B}

  def cannot_pack(self):
    return None if self.pooling == "mean" else f"task.pooling {self.pooling} reads a row's first token"

  def collate_packed_tokens(self, ex, p) -> dict:
    """The backbone's fields of a packed batch and each slot's weight ([R, K]: 0 where empty)."""
    return {**packed_tokens(ex.fields["ids"], p, self.pad_id), "weights": (p.index >= 0).astype(np.float32)}

  def collate_packed(self, ex, p):
    return {**self.collate_packed_tokens(ex, p), "labels": packing.per_example(ex.fields["labels"], p.index)}

  def init_head(self, rng):
    return new_dense(rng, self.backbone, len(self.label_names))

  def features(self, backbone_out, batch):
    if "segment_ids" in batch:  # packed: [R, K, D], one mean per slot
      return packing.segment_mean(backbone_out["hidden"].astype(jnp.float32), batch["segment_ids"],
                                  batch["weights"].shape[-1])
    if self.pooling == "cls":
      pooled = backbone_out["pooled"]
      return (backbone_out["hidden"][:, 0] if pooled is None else pooled).astype(jnp.float32)
    h_BxLxD = backbone_out["hidden"].astype(jnp.float32)
    m_BxLx1 = batch["attention_mask"][..., None].astype(h_BxLxD.dtype)
    return (h_BxLxD * m_BxLx1).sum(1) / jnp.maximum(m_BxLx1.sum(1), 1.0)

  def head(self, w, pooled_BxD, batch, train, rng):
    return dense_head(w, pooled_BxD, self.backbone.head_dropout, train, rng)

  def loss(self, logits_BxC, batch):
    loss = smoothed_cross_entropy(logits_BxC, batch["labels"], batch["weights"], self.cfg.task.label_smoothing)
    return loss, {"accuracy": accuracy(logits_BxC, batch["labels"], batch["weights"])}

  def eval_sums(self, logits_BxC, batch):
    return confusion_sums(logits_BxC, batch["labels"], batch["weights"])

  def finalize(self, sums, rows, ex):
    return from_confusion(sums["confusion"], sums["loss_sum"], sums["count"])

  def save(self, head_params, out_dir):
    super().save(head_params, out_dir)
    if self.pooling == "mean":  # sentence-transformers' marker: `task.pooling: auto` reads it back
      (out_dir / "1_Pooling").mkdir(exist_ok=True)
      (out_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
