"""train.batch_schedule: a batch that grows with the gradient noise scale (McCandlish et al. 2018; batch
warm-up as in Merrill et al. 2025). The run starts at train.batch_size, measuring B_simple from its
micro-batches (noise_scale.py); every `every` batches of train.batch_size (a "unit": the loop's step counter
counts them, so steps, logs and schedules stay in examples) it doubles the batch, adding micro-batches, while
B_simple is at least the batch, up to `max`. A batch of k units is the next k training batches of
train.batch_size, joined; each k is one more compiled step, the optimizer state carries over, and the LR
schedule runs over units with its peak scaled to the batch by optim.scale_lr (optim.make_optimizer's `units`).
"""
import math

import numpy as np

from jaxft.data import batching


def check(cfg, check) -> None:
  sched = cfg.train.batch_schedule
  if sched is None:
    return
  b, micro = cfg.train.batch_size, cfg.train.micro_batch_size
  check(isinstance(sched, dict) and set(sched) <= {"max", "every"} and isinstance(sched.get("max"), int)
        and isinstance(sched.get("every", 1), int) and sched.get("every", 1) >= 1,
        f"config key 'train.batch_schedule' must be {{max: the largest batch, every: units between checks}}, "
        f"got {sched!r}")
  grow = sched["max"] / b
  check(grow >= 2 and grow == 2 ** round(math.log2(grow)),
        f"config key 'train.batch_schedule.max' ({sched['max']}) must be train.batch_size ({b}) times a power of 2")
  check(micro is not None and b // micro >= 2, "config key 'train.batch_schedule' needs train.micro_batch_size "
        f"with two or more micro-batches in train.batch_size ({b}): they measure the gradient noise scale")
  check(not (cfg.phases or cfg.phases_preset or cfg.train.seeds is not None or cfg.train.sweep
             or cfg.train.cache_features),
        "config key 'train.batch_schedule' with phases, train.seeds, train.sweep or train.cache_features: not "
        "supported yet")


def every(cfg) -> int:
  return cfg.train.batch_schedule.get("every", 25)


def grown(cfg, k: int, step: int, changed: int, metrics: dict) -> int:
  """The batch's units after this check: 2k where the gradient noise scale (the step's EMA, in examples) is at
  least the batch of k units, `every` units have passed since the last change, and 2k units fit `max`."""
  b = cfg.train.batch_size
  if 2 * k * b > cfg.train.batch_schedule["max"] or step - changed < every(cfg) or "noise_scale" not in metrics:
    return k
  examples = float(metrics["noise_scale"]) * k * b / max(float(metrics["batch_weight"]), 1e-12)
  return 2 * k if examples >= k * b else k


def join(batches: list[dict], multiple: int) -> dict:
  """One batch of several: their rows joined, each padded to the largest's other dims and the rows to a
  multiple of `multiple` (padding is what collate pads with: no weight, no attention, index -1)."""
  if len(batches) == 1 and len(batches[0]["index"]) % multiple == 0:
    return batches[0]
  out = {}
  for key, parts, fill in batching.padded_fields(batches, rows=False):
    pad = -sum(len(p) for p in parts) % multiple
    if pad:
      parts.append(np.full((pad,) + parts[0].shape[1:], fill, parts[0].dtype))
    out[key] = np.concatenate(parts)
  return out


def crossed(step: int, k: int, period: int) -> bool:
  """Whether the units step - k + 1 .. step include a multiple of `period`."""
  return step // period > (step - k) // period
