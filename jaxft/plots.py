"""PNG plots (matplotlib, the `plot` extra): `jaxft plot RUN_DIR...` draws runs' metrics.jsonl against
steps, overlaid (with the first run's task's own train metrics: grpo's reward, KL, ...); `jaxft interpolate`
draws its WiSE-FT curve. A seed-vectorised run's curves are the replicas' mean, with their 95% confidence
band; a sweep's best validation metric is drawn against each swept key too (`sweep`: RUN_DIR/sweep.png)."""
import json
from pathlib import Path

import numpy as np
import yaml

from jaxft.errors import JaxftError

PANELS = (("train", "loss", "train loss"), ("validation", None, "validation {metric}"),
          ("train", "lr", "learning rate"), ("train", "examples_per_s", "throughput (examples / s)"),
          ("train", "noise_scale", "gradient noise scale (loss weights)"))


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise JaxftError("plots need matplotlib: pip install 'jaxft[plot]'") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def read_run(run_dir) -> tuple[list[dict], str, tuple]:
  """(the rows of RUN_DIR/metrics.jsonl, its validation metric: train.best_metric or the task's, the task's
  own per-step train metrics)."""
  from jaxft import tasks
  path = Path(run_dir) / "metrics.jsonl"
  if not path.is_file():
    raise JaxftError(f"{path} does not exist: not a run directory (jaxft train writes it)")
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) if (Path(run_dir) / "config.yaml").is_file() else {}
  task = tasks.get((cfg.get("task") or {}).get("name", "sequence_classification"))
  return rows, (cfg.get("train") or {}).get("best_metric") or task.best_metric, task.train_metrics


def _curve(ax, rows, key, label):
  pts = [(r["step"], r[key], r.get(f"{key}_ci")) for r in rows if isinstance(r.get(key), (int, float))]
  if not pts:
    return False
  steps, values, ci = zip(*pts)
  line, = ax.plot(steps, values, label=label, marker="o" if len(pts) < 20 else None, markersize=3)
  if all(c is not None and c == c for c in ci):  # a seed-vectorised run: mean ± 95% CI
    ax.fill_between(steps, [v - c for v, c in zip(values, ci)], [v + c for v, c in zip(values, ci)],
                    color=line.get_color(), alpha=0.2, linewidth=0)
  return True


def runs(run_dirs: list, out) -> Path:
  """One PNG of the runs' train loss, validation metric, LR, throughput and (if logged) noise scale."""
  plt = _pyplot()
  data = [(str(d), *read_run(d)) for d in run_dirs]
  metric, own = data[0][2], data[0][3]
  panels = [p for p in PANELS if p[1] != "noise_scale" or any("noise_scale" in r for _, rows, *_ in data for r in rows)]
  panels[1:1] = [("train", key, f"train {key}") for key in own]  # the task's, e.g. grpo's reward and KL
  cols = min(len(panels), 4)
  rows_of_panels = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows_of_panels, cols, figsize=(4.2 * cols, 3.6 * rows_of_panels), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
  for ax, (split, key, title) in zip(axes.flat, panels):
    for name, rows, m, _ in data:
      _curve(ax, [r for r in rows if r.get("split") == split], key or m, name)
    ax.set_title(title.format(metric=metric))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  return _save(fig, plt, out)


def sweep(run_dir, out) -> Path | None:
  """A train.sweep run's best validation metric of each replica against each swept key (a point per replica,
  the line through each value's mean over the rest); None for a run that is no sweep."""
  from jaxft import replicas, tasks
  from jaxft.config import load_config
  path = Path(run_dir) / "config.yaml"
  cfg = load_config(str(path), ()) if path.is_file() else None
  if cfg is None or not cfg.train.sweep:
    return None
  rows, metric, _ = read_run(run_dir)
  lower = metric in tasks.get(cfg.task.name).lower_is_better
  per_step = [r[f"{metric}_seeds"] for r in rows if r.get("split") == "validation" and f"{metric}_seeds" in r]
  if not per_step:
    return None
  best = [(np.nanmin if lower else np.nanmax)(values) for values in zip(*per_step)]  # nan: dropped (sweep_prune)
  grid = replicas.grid(cfg)
  plt = _pyplot()
  keys = list(cfg.train.sweep)
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    xs = [setting[key] for setting, _ in grid]
    ax.scatter(xs, best, s=14, alpha=0.6)
    values = sorted(set(xs))
    ax.plot(values, [sum(b for x, b in zip(xs, best) if x == v) / xs.count(v) for v in values], marker="o")
    if key.endswith(".lr") and min(values) > 0:
      ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_title(f"best validation {metric}")
    ax.grid(alpha=0.3)
  return _save(fig, plt, out)


def interpolation(rows: list[dict], metric: str, out, title: str = "") -> Path:
  """The WiSE-FT curve: `metric` against alpha, for validation and test."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.8))
  for split in ("validation", "test"):
    pts = [{"step": r["alpha"], **r} for r in rows if r["split"] == split]
    _curve(ax, pts, metric, split)
  ax.set_xlabel("alpha (0: pretrained + probe head, 1: fine-tuned)")
  ax.set_ylabel(metric)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, plt, out)


def _save(fig, plt, out) -> Path:
  out = Path(out)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
