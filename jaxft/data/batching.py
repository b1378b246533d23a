"""Encoded examples -> padded, length-bucketed batches (collated by the task), served by grain.

Train batches: each epoch is a seeded permutation; within windows of `sort_window` (64) batches
examples are sorted by length (so most batches fit a short bucket), then the batch order is shuffled. Batch i
of the run is a pure function of (seed, i), so the grain iterator state is just a position and
resuming gives exactly the batches an uninterrupted run would have seen.
"""
import functools
import math

import grain
import numpy as np

from jaxft.errors import JaxftError
from jaxft.tasks.base import Examples


def bucket(length: int, buckets) -> int:
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


def derived_buckets(max_length: int) -> list[int]:
  """Bucket lengths up to max_length when data.buckets is not given: steps of 8 to 48, then x1.5 / x2
  alternately (64, 96, 128, 192, ...), ending at max_length."""
  series = [16, 24, 32, 40, 48] + [m * 2 ** k for k in range(12) for m in (64, 96)]
  return [b for b in sorted(series) if b < max_length] + [max_length]


def collate(ex: Examples, idx, buckets, task_collate, batch_size: int | None = None) -> dict:
  """Examples `idx`, padded by the task to one bucket length; rows past len(idx) (up to batch_size)
  have weight 0 and index -1 (`index`: example positions, for per-example outputs and cached features)."""
  batch_size = batch_size or len(idx)
  batch = task_collate(ex, idx, bucket(max(ex.lengths[i] for i in idx), buckets), batch_size)
  index_B = np.full((batch_size,), -1, np.int32)
  index_B[:len(idx)] = idx
  return {**batch, "index": index_B}


class TrainBatches:
  """grain random-access source: item i is (this host's `rows` of) the i-th global training batch.
  The bucket is chosen from the whole global batch, so every host pads to the same length."""

  def __init__(self, data: Examples, task_collate, batch_size: int, num_steps: int, seed: int, buckets,
               rows: slice = slice(None), sort_window: int = 64):
    self.data, self.task_collate, self.batch_size, self.num_steps = data, task_collate, batch_size, num_steps
    self.rows, self.sort_window, self.seed, self.buckets = rows, sort_window, seed, buckets
    self.steps_per_epoch = len(data) // batch_size
    if self.steps_per_epoch == 0:
      raise JaxftError(f"train.batch_size={batch_size} is larger than the training set ({len(data)})")

  def __len__(self):
    return self.num_steps

  @functools.lru_cache(maxsize=2)
  def epoch_plan(self, epoch: int) -> np.ndarray:
    """[steps_per_epoch, batch_size] example indices for one epoch."""
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(len(self.data))[: self.steps_per_epoch * self.batch_size]
    lengths = self.data.lengths[perm]
    window = self.sort_window * self.batch_size
    for s in range(0, len(perm), window):  # a window of 1 batch leaves batches iid
      order = np.argsort(lengths[s:s + window], kind="stable")
      perm[s:s + window] = perm[s:s + window][order]
    batches = perm.reshape(self.steps_per_epoch, self.batch_size)
    return batches[rng.permutation(self.steps_per_epoch)]

  def __getitem__(self, i: int):
    epoch, pos = divmod(int(i), self.steps_per_epoch)
    batch = collate(self.data, self.epoch_plan(epoch)[pos], self.buckets, self.task_collate)
    return {k: v[self.rows] for k, v in batch.items()}  # this host's rows of the global batch


def train_dataset(data: Examples, task_collate, batch_size, num_steps, seed, buckets, rows=slice(None),
                  sort_window=64):
  """A grain dataset of training batches, prefetched by a background thread."""
  source = TrainBatches(data, task_collate, batch_size, num_steps, seed, buckets, rows, sort_window)
  return grain.MapDataset.source(source).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def eval_batches(data: Examples, task_collate, batch_size: int, buckets):
  """Evaluation batches in length order (padding rows have weight 0); every example exactly once."""
  order = np.argsort(data.lengths, kind="stable")
  for s in range(0, len(order), batch_size):
    yield collate(data, order[s:s + batch_size], buckets, task_collate, batch_size)


def steps_for(num_examples: int, batch_size: int, epochs: float) -> int:
  return max(1, math.ceil(epochs * (num_examples // batch_size)))
