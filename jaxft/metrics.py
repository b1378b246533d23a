"""Classification metrics and the run's metric sinks (metrics.jsonl + TensorBoard events)."""
import json
import time
from pathlib import Path

import numpy as np


def from_confusion(confusion: np.ndarray, loss_sum: float, count: float) -> dict:
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


class MetricWriter:
  """Appends {"step", "split", ...} lines to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, run_dir: Path, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
      self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, "time": round(time.time(), 3),
           **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
