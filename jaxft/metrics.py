"""The run's metric sinks: metrics.jsonl and TensorBoard events."""
import json
import math
import time
from pathlib import Path


class MetricWriter:
  """Appends {"step", "split", ...} lines to metrics.jsonl and scalars to TensorBoard.

  resume_step: the step the run restarts from (None: from scratch). Rows an interrupted run wrote
  past it, and earlier test rows, are dropped first, so a resumed run's file reads like one run's; TensorBoard
  is told to drop its events past it (a purge marker at resume_step + 1, or 0 from scratch)."""

  def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      path = Path(run_dir) / "metrics.jsonl"
      if path.exists():
        keep = [line for line in path.read_text().splitlines(keepends=True) if _kept(line, resume_step)]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)  # atomic: a crash here leaves the old file or the new one
      self.jsonl = open(path, "a")
      # TensorBoard hides events at or after purge_step that earlier event files hold (an interrupted run's tail);
      # the suffix keeps a resume within the same second from overwriting the earlier file (named by the second)
      self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=0 if resume_step is None else resume_step + 1,
                              filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, "time": round(time.time(), 3),
           **{k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for k, v in metrics.items():  # a list: one value per replica (train.seeds), curve r of `k`
      for tag, x in ([(f"{k}/{r}", x) for r, x in enumerate(v)] if isinstance(v, list) else [(k, v)]):
        if not (isinstance(v, list) and math.isnan(x)):  # nan: a replica train.sweep_prune dropped
          self.tb.add_scalar(f"{split}/{tag}", float(x), int(step))

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _kept(line: str, resume_step: int | None) -> bool:
  try:
    row = json.loads(line)
  except json.JSONDecodeError:  # a line cut by a crash
    return False
  return resume_step is not None and row.get("split") != "test" and row.get("step", 0) <= resume_step
