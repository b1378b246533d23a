"""Text regression: one or more real-valued targets per text (task.targets), from a pooled encoding and a new
Dense head, trained on the mean squared error (the HF Flax GLUE recipe fits STS-B this way).

Targets are standardised with the training split's mean and standard deviation (task.standardize), so the
head starts at the scale its initialisation expects; predictions are mapped back before scoring. Pooling and
packing are sequence classification's (task.pooling). Metrics: loss (the training MSE, standardised units),
mse (the targets' units), pearson and spearman (each target's correlation over the split, averaged).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxft.config import TaskConfig
from jaxft.data import packing
from jaxft.errors import JaxftError
from jaxft.tasks.base import Examples, Task, column, new_dense, require_columns
from jaxft.tasks.sequence_classification import SequenceClassification, tokenize


@dataclasses.dataclass
class Config(TaskConfig):
  text_column: str = "text"
  targets: list[str] = dataclasses.field(default_factory=lambda: ["label"])  # real-valued columns, one head output each
  pooling: str = "auto"  # mean | cls (pooler or first token) | auto (the checkpoint's)
  standardize: bool = True  # fit (target - train mean) / train std; report in the targets' own units

  def check(self):
    self.require(len(self.targets) >= 1 and len(set(self.targets)) == len(self.targets),
                 f"config key 'task.targets' must name one column or more, each once, got {self.targets}")
    self.require(self.pooling in ("auto", "cls", "mean"),
                 f"config key 'task.pooling' must be auto, cls or mean, got {self.pooling!r}")


class Regression(SequenceClassification):
  metrics = ("loss", "mse", "pearson", "spearman")
  best_metric = "pearson"
  lower_is_better = ("loss", "mse")

  def __init__(self, cfg, backbone, source, log=print):
    Task.__init__(self, cfg, backbone, source, log)
    t = cfg.task
    self.pooling = backbone.pooling if t.pooling == "auto" else t.pooling
    require_columns(source.splits["train"], (t.text_column, *t.targets), "set task.text_column / task.targets")
    self.label_names = list(t.targets)
    train = self._targets(source.splits["train"], "train")
    if len(train) < 2:
      raise JaxftError(f"task.targets: {len(train)} training example(s); a regression needs two or more")
    self.mean, self.std = (train.mean(0), train.std(0)) if t.standardize else (np.zeros(len(t.targets)),
                                                                              np.ones(len(t.targets)))
    if (self.std == 0).any():
      raise JaxftError(f"task.targets: '{t.targets[int(np.argmin(self.std))]}' is constant in the training data: "
                       f"nothing to learn (is it the right column?)")
    self.std = self.std.astype(np.float32)
    self.mean = self.mean.astype(np.float32)

  def relabel(self, names, origin):
    """The targets in `origin`'s order (the same columns: a regression head has one output per target)."""
    if sorted(names) != sorted(self.label_names):
      raise JaxftError(f"config key 'task.targets' is {self.label_names}; {origin} was trained on {names}")
    order = [self.label_names.index(n) for n in names]
    self.mean, self.std = self.mean[order], self.std[order]
    super().relabel(names, origin)

  def _targets(self, records, split: str) -> np.ndarray:
    """[N, T] float64 targets."""
    cols = [column(records, c, split, (int, float)) for c in self.label_names]
    return np.asarray(cols, np.float64).T.reshape(len(records), len(cols))

  def encode(self, records, split):
    ids = tokenize(self.backbone, column(records, self.cfg.task.text_column, split), self.cfg.data.max_length)
    y = ((self._targets(records, split) - self.mean) / self.std).astype(np.float32)
    return Examples(np.array([len(x) for x in ids]), {"ids": ids, "targets": y})

  def collate(self, ex, idx, length, batch_size, epoch=None, seed=None):
    targets_BxT = np.zeros((batch_size, len(self.label_names)), np.float32)
    targets_BxT[:len(idx)] = ex.fields["targets"][idx]
    return {**self.collate_tokens(ex, idx, length, batch_size), "targets": targets_BxT}

  def collate_packed(self, ex, p):
    return {**self.collate_packed_tokens(ex, p), "targets": packing.per_example(ex.fields["targets"], p.index)}

  def init_head(self, rng):
    return new_dense(rng, self.backbone, len(self.label_names))

  def loss(self, pred_BxT, batch):
    sq_B = jnp.mean((pred_BxT - batch["targets"]) ** 2, -1)
    return jnp.sum(sq_B * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0), {}

  def eval_sums(self, pred_BxT, batch):
    sq_B = jnp.mean((pred_BxT - batch["targets"]) ** 2, -1)
    return {"sq_sum": jnp.sum(sq_B * batch["weights"]), "count": jnp.sum(batch["weights"])}

  def eval_rows(self, pred_BxT, batch):
    return {"pred": pred_BxT}

  def finalize(self, sums, rows, ex):
    pred = np.asarray(rows["pred"], np.float64) * self.std + self.mean  # [N, T], the targets' units
    gold = np.asarray(ex.fields["targets"], np.float64) * self.std + self.mean
    pearson = [stats.pearsonr(pred[:, t], gold[:, t])[0] for t in range(pred.shape[1])]
    spearman = [stats.spearmanr(pred[:, t], gold[:, t])[0] for t in range(pred.shape[1])]
    return {"loss": float(sums["sq_sum"] / max(float(sums["count"]), 1.0)), "mse": float(np.mean((pred - gold) ** 2)),
            "pearson": float(np.mean(pearson)), "spearman": float(np.mean(spearman))}
