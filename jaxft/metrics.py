"""The run's metric sinks: metrics.jsonl and TensorBoard events."""
import json
import time
from pathlib import Path


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
