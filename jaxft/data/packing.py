"""Sequence packing: a batch's examples share rows of one fixed length instead of each taking a padded row.

A batch of B examples becomes R rows of L tokens (R: the fewest rows first-fit-decreasing needs, rounded
up to a multiple, so few row counts and so few compiled shapes occur). Example k of a row holds the
tokens whose `segment_ids` are k + 1 (0: padding); attention stays inside an example and positions
restart at 0 for each, so an example packed with others computes what it computes alone
(tests/data/test_packing.py). Per-example fields become [R, K]: slot k of row r is the row's k-th example
(K = `slots`, the most examples a row holds; empty slots weigh 0).
"""
import dataclasses
import functools

import numpy as np


@dataclasses.dataclass
class Plan:
  """Where each example of a batch goes: `rows[r]` lists (example, slot, offset) in row r."""
  rows: list
  length: int  # L
  slots: int  # K

  @property
  def num_rows(self) -> int:
    return len(self.rows)

  @functools.cached_property
  def index(self):
    """[R, K] example indices by slot (-1: an empty slot)."""
    index_RxK = np.full((self.num_rows, self.slots), -1, np.int32)
    for r, row in enumerate(self.rows):
      for i, k, _ in row:
        index_RxK[r, k] = i
    return index_RxK


def _first_fit_decreasing(idx, lengths, length: int, slots: int) -> list:
  """Rows [(example, slot, offset), ...] of examples `idx`, longest first, each into the first row with
  room for it and fewer than `slots` examples."""
  order = sorted(idx, key=lambda i: -min(int(lengths[i]), length))
  free = np.full(len(order), length)  # tokens left in row r (rows past len(rows) are unopened)
  used = np.zeros(len(order), np.int32)  # examples in row r
  rows = []
  for i in order:
    n = min(int(lengths[i]), length)
    r = int(np.argmax((free >= n) & (used < slots)))  # the first row with room: an open one, or a new one
    if r == len(rows):
      rows.append([])
    rows[r].append((i, int(used[r]), length - int(free[r])))
    free[r] -= n
    used[r] += 1
  return rows


def plan(idx, lengths, length: int, slots: int, multiple: int = 1) -> Plan:
  """First-fit decreasing of examples `idx` (of `lengths[i]` tokens, at most `length`) into rows of
  `length` tokens and at most `slots` examples; the row count is rounded up to a multiple of `multiple`
  (the extra rows are empty)."""
  rows = _first_fit_decreasing(idx, lengths, length, slots)
  return Plan(rows + [[] for _ in range(-len(rows) % multiple)], length, slots)


def plans(idx, lengths, length: int, slots: int, rows: int):
  """Every example of `idx` once, packed (first-fit decreasing over all of them) into Plans of exactly
  `rows` rows, the last one padded with empty rows: a single shape."""
  packed = _first_fit_decreasing(idx, lengths, length, slots)
  packed += [[] for _ in range(-len(packed) % rows)]
  for s in range(0, len(packed), rows):
    yield Plan(packed[s:s + rows], length, slots)


def tokens(seqs, p: Plan, pad_id: int, dtype=np.int32):
  """[R, L] token ids, segment ids (k + 1 for slot k, 0 padding) and positions of `seqs` packed by `p`."""
  ids_RxL = np.full((p.num_rows, p.length), pad_id, dtype)
  segments_RxL = np.zeros((p.num_rows, p.length), np.int32)
  positions_RxL = np.zeros((p.num_rows, p.length), np.int32)
  for r, row in enumerate(p.rows):
    for i, k, offset in row:
      x = seqs[i][:p.length - offset]
      ids_RxL[r, offset:offset + len(x)] = x
      segments_RxL[r, offset:offset + len(x)] = k + 1
      positions_RxL[r, offset:offset + len(x)] = np.arange(len(x))
  return ids_RxL, segments_RxL, positions_RxL


def per_example(values, index_RxK, fill=0):
  """[R, K, ...] of values[i] at example i's slot (`fill` in empty slots)."""
  values = np.asarray(values)
  mask = (index_RxK >= 0).reshape(index_RxK.shape + (1,) * (values.ndim - 1))
  return np.where(mask, values[np.maximum(index_RxK, 0)], fill).astype(values.dtype)


def segment_mean(h_RxLxD, segments_RxL, slots: int):
  """[R, K, D] mean of the hidden states of each slot's tokens (0 for an empty slot); jax arrays."""
  import jax.numpy as jnp
  member_RxKxL = (segments_RxL[:, None, :] == jnp.arange(1, slots + 1)[None, :, None]).astype(h_RxLxD.dtype)
  count_RxKx1 = jnp.maximum(member_RxKxL.sum(-1, keepdims=True), 1.0)
  return jnp.einsum("rkl,rld->rkd", member_RxKxL, h_RxLxD) / count_RxKx1
