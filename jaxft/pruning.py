"""train.sweep_prune: successive halving of a sweep's settings (Jamieson & Talwalkar 2016; Li et al.'s
Hyperband). At the given fractions of training every replica is evaluated on validation; the settings whose
seeds' mean best validation metric ranks below the kept fraction are dropped, all their seeds together, and
training goes on with the replicas left: a narrower replica axis, one more compile. Checkpoints keep every
replica (a dropped one as it was when dropped), so resume, each replica's best, eval, soup and export read a
pruned run as any other; the run record says which replicas still train (RunRecord.pruned).
"""
import math


def steps(cfg, total_steps: int) -> set[int]:
  """The steps at which train.sweep_prune drops settings (its fractions of the run's steps)."""
  prune = cfg.train.sweep_prune
  return {max(1, round(f * total_steps)) for f in prune["at"]} if prune else set()


def alive(record, n: int) -> list[int]:
  """The replicas still training, by the run record."""
  return [r for r in range(n) if record.pruned is None or record.pruned[r] is None]


def _key(setting: dict) -> tuple:
  return tuple(sorted(setting.items()))


def distinct(settings: tuple, replicas) -> int:
  """How many settings the `replicas` (indices) train."""
  return len({_key(settings[r]) for r in replicas})


def survivors(settings: tuple, alive: list[int], best_values: list, keep: float, lower_is_better: bool) -> list[int]:
  """The replicas (indices) left after dropping the worst of the `alive` replicas' settings: ceil(keep x their
  count) settings stay, ranked by the mean of their seeds' best validation values (a replica with none ranks
  last; ties keep the setting listed first)."""
  groups = {}
  for r in alive:
    groups.setdefault(_key(settings[r]), []).append(r)

  def score(members):
    values = [best_values[r] for r in members]
    if any(v is None or math.isnan(v) for v in values):
      return math.inf
    mean = sum(values) / len(values)
    return mean if lower_is_better else -mean

  ranked = sorted(groups.values(), key=score)
  return sorted(r for members in ranked[:max(1, math.ceil(keep * len(groups)))] for r in members)
