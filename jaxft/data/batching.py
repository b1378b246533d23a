"""Encoded examples -> batches (collated by the task), served by grain: packed rows or length buckets.

Train batches: each epoch is a seeded permutation cut into batches of `batch_size` examples. Packed
(data/packing.py), each batch's examples share rows of one length and batches are iid. Unpacked, each
batch is padded to a length bucket, and within windows of `sort_window` (64) batches examples are sorted
by length (so most batches fit a short bucket) before the batch order is shuffled. Batch i of the run is
a pure function of (seed, i) (train-time augmentation too: of (seed, example, epoch)), so the grain iterator state is just a position and resuming gives exactly
the batches an uninterrupted run would have seen.
"""
import functools
import math
import os

import grain
import numpy as np

from jaxft.data import packing
from jaxft.errors import JaxftError


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


def length_buckets(data_cfg) -> list[int]:
  """The bucket lengths batches pad to: data.buckets, else derived from data.max_length."""
  return data_cfg.buckets or derived_buckets(data_cfg.max_length)


def collate(ex, idx, buckets, task_collate, batch_size: int | None = None, epoch: int | None = None,
            seed: int | None = None) -> dict:
  """Examples `idx`, padded by the task to one bucket length; rows past len(idx) (up to batch_size)
  have weight 0 and index -1 (`index`: example positions, for per-example outputs and cached features).
  epoch, seed: the training epoch and the data order's seed, for the task's train-time augmentation;
  epoch None in evaluation."""
  batch_size = batch_size or len(idx)
  batch = task_collate(ex, idx, bucket(max(ex.lengths[i] for i in idx), buckets), batch_size, epoch=epoch,
                       seed=seed)
  index_B = np.full((batch_size,), -1, np.int32)
  index_B[:len(idx)] = idx
  return {**batch, "index": index_B}


def collate_packed(ex, idx, task_collate_packed, length: int, slots: int, multiple: int, epoch=None,
                   seed=None) -> dict:
  """Examples `idx` packed into rows of `length` tokens (a multiple of `multiple` rows); `index` [R, K].
  (Packing tasks have no train-time augmentation: `epoch` and `seed` are not used.)"""
  p = packing.plan(idx, ex.lengths, length, slots, multiple)
  return {**task_collate_packed(ex, p), "index": p.index}


class TrainBatches:
  """grain random-access source: item i is (this host's rows of) the i-th global training batch, made
  by make_batch(examples, idx, epoch=epoch, seed=seed) from the whole global batch, so every host gets the same shape.
  rows_of(n): the rows of an n-row global batch this host feeds. sort_window: see the module doc (1 for
  packed batches)."""

  def __init__(self, data, make_batch, batch_size: int, num_steps: int, seed: int,
               rows_of=lambda n: slice(None), sort_window: int = 64):
    self.data, self.make_batch, self.batch_size, self.num_steps = data, make_batch, batch_size, num_steps
    self.rows_of, self.sort_window, self.seed = rows_of, sort_window, seed
    self.steps_per_epoch = len(data) // batch_size
    if self.steps_per_epoch == 0:
      raise JaxftError(f"train.batch_size={batch_size} is larger than the training set ({len(data)})")

  def __len__(self):
    return self.num_steps

  @functools.lru_cache(maxsize=2)  # noqa: B019 (one sampler per run: holding it is fine)
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

  def indices(self, i: int) -> np.ndarray:
    """The examples of global batch i."""
    epoch, pos = divmod(int(i), self.steps_per_epoch)
    return self.epoch_plan(epoch)[pos]

  def __getitem__(self, i: int):
    epoch = int(i) // self.steps_per_epoch
    batch = self.make_batch(self.data, self.indices(i), epoch=epoch, seed=self.seed)
    rows = self.rows_of(len(batch["index"]))
    return {k: v[rows] for k, v in batch.items()}  # this host's rows of the global batch


def bucketed(data, task_collate, batch_size, num_steps, seed, buckets, rows_of=lambda n: slice(None),
             sort_window: int = 64) -> TrainBatches:
  """Training batches padded to length buckets."""
  make = functools.partial(collate, buckets=buckets, task_collate=task_collate)
  return TrainBatches(data, make, batch_size, num_steps, seed, rows_of, sort_window)


def workers(n: int | None) -> int:
  """data.workers: n, or (None) one per core of the host, at most 16 (on this project's 2-core CPU the vision
  config trained at 281 examples/s with 2 and 202 with 1, as measured for issue 30; not re-measured here)."""
  return n or min(16, os.cpu_count() or 1)


def padded_fields(batches: list[dict], rows: bool = True):
  """(key, that field of each batch padded at the end of each axis to the largest's, the fill) for every field of
  several batches; the rows (axis 0) too where `rows`. The fill is what collate pads with: no weight, no
  attention (mask, segment 0), index -1."""
  for key in batches[0]:
    arrays = [np.asarray(b[key]) for b in batches]
    shape, fill = np.max([a.shape for a in arrays], axis=0), (-1 if key == "index" else 0)
    yield key, [np.pad(a, [(0, n - m) if rows or axis else (0, 0) for axis, (n, m) in enumerate(zip(shape, a.shape))],
                       constant_values=fill) for a in arrays], fill


def train_dataset(source: TrainBatches, workers: int = 1):
  """A grain dataset of training batches, made ahead (tokens collated, images decoded and augmented) by
  `workers` background threads."""
  options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(4, 2 * workers))
  return grain.MapDataset.source(source).to_iter_dataset(options)


def eval_batches(data, task_collate, batch_size: int, buckets):
  """Evaluation batches in length order (padding rows have weight 0); every example exactly once."""
  order = np.argsort(data.lengths, kind="stable")
  for s in range(0, len(order), batch_size):
    yield collate(data, order[s:s + batch_size], buckets, task_collate, batch_size)


def packed_eval_batches(data, task_collate_packed, rows: int, length: int, slots: int):
  """Evaluation batches of `rows` packed rows of `length` tokens (one shape); every example exactly once."""
  for p in packing.plans(np.arange(len(data)), data.lengths, length, slots, rows):
    yield {**task_collate_packed(data, p), "index": p.index}


def steps_for(num_examples: int, batch_size: int, epochs: float) -> int:
  return max(1, math.ceil(epochs * (num_examples // batch_size)))
