"""Seed-vectorised runs (`train.seeds`): N independent replicas of one run, each with its own head
initialisation, LoRA adapters, dropout keys and data order, trained side by side by ONE compiled step.

The train state gains a leading replica axis [R, ...] on everything a replica owns: the params that some
phase trains, the optimizer state, BatchNorm statistics, the step counter and the dropout key. Params
that no phase trains (frozen embeddings, the LoRA base) are shared: one copy, in the state and in its
checkpoints. The step is the ordinary train step under `jax.vmap` (in_axes 0 for owned leaves, None for
shared ones), so replica k computes exactly what the single run with seed k computes. Each step feeds
every replica its own batch; their shapes (packed rows, length buckets) are padded to a common one with
weight-0 rows and positions, which change no loss.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import rules
from jaxft.step import TrainState


def seeds_of(cfg) -> list[int]:
  """The replicas' seeds: train.seeds N -> seed .. seed + N - 1, or the list given; [] for a plain run."""
  s = cfg.train.seeds
  if s is None:
    return []
  return list(range(cfg.seed, cfg.seed + s)) if isinstance(s, int) else [int(x) for x in s]


def owned(phases) -> frozenset:
  """Param paths some phase trains: each replica has its own copy of these."""
  return frozenset(p for ph in phases for p, label in rules.flat(ph.labels).items() if label == "train")


def axes(state: TrainState, own: frozenset) -> TrainState:
  """vmap axes of a replicated state: 0 on every leaf, None on the shared (never trained) params."""
  flat = rules.flat(state.params)
  params = rules.merge({p: (0 if p in own else None) for p in flat})
  return jax.tree.map(lambda _: 0, state).replace(params=params)


def stack(states: list[TrainState], own: frozenset) -> TrainState:
  """One replicated state from per-replica ones (the shared params taken from the first)."""
  flat = [rules.flat(s.params) for s in states]
  params = rules.merge({p: (jnp.stack([f[p] for f in flat]) if p in own else x) for p, x in flat[0].items()})
  rest = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.replace(params={}) for s in states])
  return rest.replace(params=params)


def initial_state(exp, seeds: list[int]) -> TrainState:
  """Phase 0's replicated initial state: replica k as the single run with seed seeds[k] starts."""
  return stack([exp.initial_state(s) for s in seeds], owned(exp.phases))


def vectorize_train(train_step, state_axes: TrainState):
  """(replicated state, batches [R, ...]) -> (state, metrics [R]) of the per-replica step."""
  return jax.vmap(train_step, in_axes=(state_axes, 0), out_axes=(state_axes, 0))


_INDEX_FILL = -1  # `index` marks empty rows / slots with -1; every other field pads with 0 (weight 0)


def stack_batches(batches: list[dict]) -> dict:
  """[R, ...] fields of R replicas' batches, each padded at the end of every axis to the largest shape.
  Padding is what collate pads with: no weight, no attention (mask, segment 0), index -1."""
  out = {}
  for key in batches[0]:
    arrays = [np.asarray(b[key]) for b in batches]
    shape = np.max([a.shape for a in arrays], axis=0)
    fill = _INDEX_FILL if key == "index" else 0
    out[key] = np.stack([np.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)], constant_values=fill)
                         for a in arrays])
  return out


class Batches:
  """The training batches of every replica, step by step: item i is the [R, ...] stack of each replica's
  batch i in its own data order (a grain source, like batching.TrainBatches)."""

  def __init__(self, sources: list):
    self.sources = sources

  def __len__(self):
    return len(self.sources[0])

  def __getitem__(self, i: int) -> dict:
    return stack_batches([s[i] for s in self.sources])


def summary(values) -> tuple[float, float]:
  """(mean, half-width of the 95% confidence interval of the mean: Student's t, n - 1 degrees of
  freedom); the half-width is nan for one value."""
  from scipy import stats
  x = np.asarray(values, np.float64)
  if len(x) < 2:
    return float(x.mean()), math.nan
  return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
