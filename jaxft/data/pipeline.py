"""Tokenised examples -> padded, length-bucketed batches, served by grain.

Train batches: each epoch is a seeded permutation; within windows of `sort_window` (64) batches
examples are sorted by length (so most batches fit a short bucket), then the batch order is shuffled. Batch i
of the run is a pure function of (seed, i), so the grain iterator state is just a position and
resuming gives exactly the batches an uninterrupted run would have seen.
"""
import dataclasses
import functools
import math

import grain
import numpy as np

from jaxft.errors import JaxftError


@dataclasses.dataclass
class Encoded:
  ids: list[np.ndarray]  # token ids per example, truncated to max_length
  labels: np.ndarray  # [N] int32

  @property
  def lengths(self):
    return np.array([len(x) for x in self.ids])


def encode(tokenizer, texts, labels, max_length: int) -> Encoded:
  out = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                  return_attention_mask=False, return_token_type_ids=False)
  return Encoded([np.asarray(x, np.int32) for x in out["input_ids"]], np.asarray(labels, np.int32))


def bucket(length: int, buckets) -> int:
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


def collate(data: Encoded, idx, buckets, pad_id: int, batch_size: int | None = None):
  """Pads examples `idx` to one bucket length; rows past len(idx) (up to batch_size) get weight 0
  and index -1."""
  batch_size = batch_size or len(idx)
  L = bucket(max(len(data.ids[i]) for i in idx), buckets)
  ids_BxL = np.full((batch_size, L), pad_id, np.int32)
  mask_BxL = np.zeros((batch_size, L), np.int32)
  for row, i in enumerate(idx):
    x = data.ids[i][:L]
    ids_BxL[row, :len(x)] = x
    mask_BxL[row, :len(x)] = 1
  labels_B = np.zeros((batch_size,), np.int32)
  labels_B[:len(idx)] = data.labels[idx]
  weights_B = np.zeros((batch_size,), np.float32)
  weights_B[:len(idx)] = 1.0
  index_B = np.full((batch_size,), -1, np.int32)  # example positions (cached-feature lookups)
  index_B[:len(idx)] = idx
  return {"input_ids": ids_BxL, "attention_mask": mask_BxL, "token_type_ids": np.zeros_like(ids_BxL),
          "labels": labels_B, "weights": weights_B, "index": index_B}


class TrainBatches:
  """grain random-access source: item i is (this host's `rows` of) the i-th global training batch.
  The bucket is chosen from the whole global batch, so every host pads to the same length."""

  def __init__(self, data: Encoded, batch_size: int, num_steps: int, seed: int, buckets, pad_id: int,
               rows: slice = slice(None), sort_window: int = 64):
    self.data, self.batch_size, self.num_steps, self.rows = data, batch_size, num_steps, rows
    self.sort_window = sort_window
    self.seed, self.buckets, self.pad_id = seed, buckets, pad_id
    self.steps_per_epoch = len(data.labels) // batch_size
    if self.steps_per_epoch == 0:
      raise JaxftError(f"train.batch_size={batch_size} is larger than the training set ({len(data.labels)})")

  def __len__(self):
    return self.num_steps

  @functools.lru_cache(maxsize=2)
  def epoch_plan(self, epoch: int) -> np.ndarray:
    """[steps_per_epoch, batch_size] example indices for one epoch."""
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(len(self.data.labels))[: self.steps_per_epoch * self.batch_size]
    lengths = self.data.lengths[perm]
    window = self.sort_window * self.batch_size
    for s in range(0, len(perm), window):  # a window of 1 batch leaves batches iid
      order = np.argsort(lengths[s:s + window], kind="stable")
      perm[s:s + window] = perm[s:s + window][order]
    batches = perm.reshape(self.steps_per_epoch, self.batch_size)
    return batches[rng.permutation(self.steps_per_epoch)]

  def __getitem__(self, i: int):
    epoch, pos = divmod(int(i), self.steps_per_epoch)
    batch = collate(self.data, self.epoch_plan(epoch)[pos], self.buckets, self.pad_id)
    return {k: v[self.rows] for k, v in batch.items()}  # this host's rows of the global batch


def train_dataset(data: Encoded, batch_size, num_steps, seed, buckets, pad_id, rows=slice(None), sort_window=64):
  """A grain dataset of training batches, prefetched by a background thread."""
  source = TrainBatches(data, batch_size, num_steps, seed, buckets, pad_id, rows, sort_window)
  return grain.MapDataset.source(source).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def eval_batches(data: Encoded, batch_size: int, buckets, pad_id: int):
  """Evaluation batches in length order (padding rows have weight 0); every example exactly once."""
  order = np.argsort(data.lengths, kind="stable")
  for s in range(0, len(order), batch_size):
    yield collate(data, order[s:s + batch_size], buckets, pad_id, batch_size)


def steps_for(num_examples: int, batch_size: int, epochs: float) -> int:
  return max(1, math.ceil(epochs * (num_examples // batch_size)))
