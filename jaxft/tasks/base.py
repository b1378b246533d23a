"""The task contract. A task turns raw records into arrays, adds a head to the backbone, and owns its
loss and metrics. The loop, the step, rules, optimizer, mesh and checkpoints never know which task runs.

Data flow through a task (B: batch, L: tokens, D: hidden size):
  records --encode--> Examples --collate--> batch dict of [B, ...] numpy arrays
  backbone outputs --features--> feats --head--> outputs --loss--> (loss, aux)
                                                        --eval_sums--> summed over a split (device)
                                                        --eval_rows--> kept per example (host)
  sums, rows, Examples --finalize--> metrics
"""
import dataclasses
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import labels
from jaxft.data import packing
from jaxft.errors import JaxftError


@dataclasses.dataclass
class Examples:
  """One split, encoded by its task. `lengths` drives length bucketing; `fields` are what `collate`
  reads per example; `meta` is host-only data for `finalize` (gold spans, offsets, ...)."""
  lengths: np.ndarray  # [N] tokens per example
  fields: dict  # name -> [N] array or list of per-example arrays
  meta: dict = dataclasses.field(default_factory=dict)

  def __len__(self):
    return len(self.lengths)


class Task:
  """Base class: a task module subclasses it and is registered in jaxft/tasks/__init__.py."""
  head_key = "classifier"  # the params subtree the head adds
  metrics = ("loss",)  # validation metrics finalize returns
  best_metric = "loss"  # the default train.best_metric
  lower_is_better = ("loss",)
  train_metrics = ()  # the train step's own metrics beside its loss, drawn by jaxft plot
  cacheable = False  # features of a frozen backbone can be computed once per example
  packs_eval = True  # where it packs: evaluation packs too (eval_rows, if any, are per slot: [R, K, ...])
  generates = False  # evaluation also scores generated text (score; causal LMs: generate.py)
  on_policy = False  # trains on what it generates: rollout(exp, par, state, batch, step) makes each step's batch
  tokens = True  # examples are token sequences (bench and plan count tokens); False: images
  label_names: list[str] | None = None  # what the head's outputs stand for, in order (jaxft/labels.py); None: none

  def __init__(self, cfg, backbone, source, log=print):
    """cfg: the run's Config; backbone: models.Backbone; source: data.sources.Source (records of every
    split, and the class names the source knows)."""
    self.cfg, self.backbone, self.log = cfg, backbone, log

  @classmethod
  def needs_pooler(cls, cfg, checkpoint_pooling: str) -> bool:
    """Whether the backbone should keep its pooler (asked before it loads)."""
    return False

  @property
  def head_regex(self) -> str:
    return f"{self.head_key}/.*"

  def save(self, head_params, out_dir: Path) -> None:
    """Writes the head, and its labels, beside an exported backbone, where `build` finds them again."""
    (out_dir / f"{self.head_key}.msgpack").write_bytes(flax.serialization.msgpack_serialize(head_params))
    labels.save(self.label_names, out_dir)

  def relabel(self, names: list[str], origin: str) -> None:
    """The head's outputs in the order `names` (a superset of label_names, as `origin` stored them): the
    data's labels are indexed by name into it when encoded."""
    self.label_names = names

  def encode(self, records: list[dict], split: str) -> Examples:
    raise NotImplementedError

  def collate(self, ex: Examples, idx: np.ndarray, length: int, batch_size: int, epoch: int | None = None,
              seed: int | None = None) -> dict:
    """Examples `idx` padded to `length` tokens and `batch_size` rows (extra rows weigh 0). epoch: the
    training epoch (train-time augmentation, a pure function of (seed, example, epoch)); None: evaluation.
    seed: the data order's seed (a replica's own, in seed-vectorised runs)."""
    raise NotImplementedError

  def synthetic(self, batch: dict, rng: np.random.Generator) -> dict:
    """A collated training batch with random inputs in place of the real ones, nothing padded (bench):
    every position a random token."""
    B, L = batch["input_ids"].shape
    vocab = self.backbone.processor.vocab_size
    batch["input_ids"] = rng.integers(1000 if vocab > 2000 else 5, vocab, (B, L), dtype=np.int32)
    batch["attention_mask"] = np.ones((B, L), np.int32)
    return batch

  def cannot_pack(self) -> str | None:
    """Why this task cannot pack examples into shared rows (None: it can, with collate_packed)."""
    return f"task.name {self.cfg.task.name} does not pack examples"

  def collate_packed(self, ex: Examples, p: packing.Plan) -> dict:
    """Examples packed by `p` into [R, L] rows; per-example fields [R, K] by slot (empty slots weigh 0)."""
    raise NotImplementedError

  def batch_layout(self, pack: bool, buckets: list[int]) -> str:
    """How training batches are shaped, for the run's log."""
    return f"packed into rows of {self.cfg.data.max_length}" if pack else f"length buckets {buckets}"

  def init_head(self, rng) -> Any:
    raise NotImplementedError

  def features(self, backbone_out: dict, batch: dict):
    """What the head reads (cached per example when the backbone is frozen and `cacheable`)."""
    return backbone_out["hidden"]

  def head(self, head_params, feats, batch: dict, train: bool, rng) -> Any:
    raise NotImplementedError

  def forward(self, apply):
    """The apply the train step calls: the model's (a task whose batches need another pass wraps it)."""
    return apply

  def loss(self, outputs, batch: dict):
    """(scalar loss to minimise, {name: scalar} train metrics)."""
    raise NotImplementedError

  def eval_sums(self, outputs, batch: dict) -> dict:
    """Arrays summed over all eval batches (on device)."""
    raise NotImplementedError

  def eval_rows(self, outputs, batch: dict) -> dict:
    """[B, ...] arrays kept per example for finalize (gathered to the host); {} if none."""
    return {}

  def finalize(self, sums: dict, rows: dict, ex: Examples) -> dict:
    """Metrics of a split from the summed arrays and, per example (rows[name][i]), the kept rows."""
    raise NotImplementedError

  def score(self, generated: list[str], ex: Examples, index) -> dict:
    """Metrics of the text generated from the prompts of examples `index` (tasks that generate)."""
    raise NotImplementedError

  def require_data_batches(self, tool: str) -> None:
    """bench and plan (`tool`: what they do) take a step's batches from the data; an on-policy task makes its
    own by generating (rollout), which they do not yet: a one-line error."""
    if self.on_policy:
      raise JaxftError(f"{tool} a step on batches from the data; task.name {self.cfg.task.name} makes each step's "
                       f"batch by generating (its train run logs step_ms with the generation included)")

  def trained_tokens(self, batch: dict) -> float:
    """Tokens of a host batch that bear loss (bench, plan): the sum of token weights [B, L]; per-example
    weights count every real token (the attention mask)."""
    w = np.asarray(batch.get("weights", 0.0))
    if w.ndim == 2:
      return float(w.sum())
    mask = batch.get("attention_mask", batch.get("segment_ids"))
    return float((np.asarray(mask) > 0).sum()) if mask is not None else float(w.size)

  def describe(self, metrics: dict) -> str:
    """One log line of validation metrics."""
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in self.metrics)


def pad_tokens(seqs, idx, length: int, batch_size: int, pad_id: int, dtype=np.int32):
  """[batch_size, length] rows of seqs[i] for i in idx (truncated to length), and their 0/1 mask."""
  ids_BxL = np.full((batch_size, length), pad_id, dtype)
  mask_BxL = np.zeros((batch_size, length), np.int32)
  for row, i in enumerate(idx):
    x = seqs[i][:length]
    ids_BxL[row, :len(x)] = x
    mask_BxL[row, :len(x)] = 1
  return ids_BxL, mask_BxL


def packed_tokens(seqs, p: packing.Plan, pad_id: int) -> dict:
  """The backbone's fields of a packed batch: ids, mask, types, per-example positions and segment ids."""
  ids_RxL, segments_RxL, positions_RxL = packing.tokens(seqs, p, pad_id)
  return {"input_ids": ids_RxL, "attention_mask": (segments_RxL > 0).astype(np.int32),
          "token_type_ids": np.zeros_like(ids_RxL), "position_ids": positions_RxL, "segment_ids": segments_RxL}


def require_columns(records: list[dict], columns, hint: str) -> None:
  """A one-line error naming the first of `columns` the (training) records lack."""
  missing = [c for c in columns if records and c not in records[0]]
  if missing:
    raise JaxftError(f"the training data has no column '{missing[0]}' (columns: {', '.join(map(str, records[0]))}); "
                     f"{hint}")


def require_fast_tokenizer(backbone, task: str, why: str) -> None:
  if not getattr(backbone.processor, "is_fast", False):
    raise JaxftError(f"{task} needs a fast tokenizer ({why}); {backbone.name} has {type(backbone.processor).__name__}")


def nll(logits, labels):
  """Per-position negative log-likelihood of integer `labels` under `logits` [..., C] (in float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def dense_head(w, x, rate: float, train: bool, rng):
  """Dropout (in training, with a key), then x @ kernel + bias in float32 (x: [B, D] or [B, L, D])."""
  if train and rng is not None and rate > 0:
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), 0.0)
  return x @ w["kernel"].astype(jnp.float32) + w["bias"].astype(jnp.float32)


def new_dense(rng, backbone, n_out: int) -> dict:
  """A Dense head's params: kernel ~ N(0, init_scale^2) [D, n_out], bias 0."""
  kernel = backbone.init_scale * jax.random.normal(rng, (backbone.hidden_size, n_out))
  return {"kernel": kernel, "bias": jnp.zeros((n_out,))}


_KINDS = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "a list", dict: "an object", np.ndarray: "an array"}


def where(records: list[dict], i: int, split: str) -> str:
  """Where record i of a split was read: FILE:LINE for local files (files.Record), else 'SPLIT example I'."""
  return getattr(records[i], "origin", None) or f"{split} example {i}"


def column(records: list[dict], key: str, split: str, types: tuple = (str,)) -> list:
  """Every record's `key`; a record without it, or with a value of another type (null, a number for a
  text), is a one-line error naming where the record was read and the key."""
  out = []
  for i, r in enumerate(records):
    value = r.get(key)
    if not isinstance(value, types):
      kind = _KINDS.get(type(value), f"a {type(value).__name__}")
      problem = (f"no key '{key}' (keys: {', '.join(map(str, r))})" if key not in r else
                 f"'{key}' is {kind}{'' if value is None else f' ({str(value)[:40]})'}, expected "
                 f"{' or '.join(_KINDS[t] for t in types)}")
      raise JaxftError(f"{where(records, i, split)}: {problem}")
    out.append(value)
  return out


def require_classes(what: str, names: list[str], train: set, classes_of, log) -> None:
  """The training data must have two classes or more (labels, or tags). With one only, there is nothing to
  tell apart: an error when validation and test have no other class either (a constant column, most likely
  not the label column) or have others the label names lack (names taken from the training data); a loud
  warning when the label names list the others (task.label_names, or the source's), since a run that can
  only learn to predict the one class may be meant. train: the training data's classes; classes_of(split):
  a split's (read only in that case); what: the column, as "task.label_column 'label'"."""
  if len(train) != 1:
    return
  (only,) = train
  others = sorted((classes_of("validation") | classes_of("test")) - train)
  if not others:
    raise JaxftError(f"{what} has one class only, '{only}', in every split: nothing to learn (is it the right column?)")
  message = f"the training data has one class only in {what}: '{only}' (validation / test have {others[:5]})"
  if not set(others) <= set(names):
    raise JaxftError(f"{message}; put examples of every class in data.train, or list them all in task.label_names")
  log(f"[bold red]warning:[/] {message}: the run can only learn to predict '{only}'")


class ClassLabels:
  """The classes of task.label_column: task.label_names, else the source's (a TFDS ClassLabel, whose ints
  the records hold), else the sorted distinct training labels. Training data with one class only is an
  error, or a warning (require_classes)."""

  def __init__(self, cfg, source, log=print):
    self.column, self.known = cfg.task.label_column, source.label_names.get(cfg.task.label_column)
    classes = set(self.of(source.splits["train"], "train"))
    self.names = cfg.task.label_names or self.known or sorted(classes)
    require_classes(f"task.label_column '{self.column}'", self.names, classes,
                    lambda split: set(self.of(source.splits.get(split, []), split)), log)

  def of(self, records, split: str) -> list[str]:
    """Every record's label, as a class name."""
    if self.known is not None:
      return [self.known[v] for v in column(records, self.column, split, (int,))]
    return [str(v) for v in column(records, self.column, split, (str, int))]

  def index(self, names: list[str], records, split: str) -> np.ndarray:
    """[N] int32 indices into `names` (the task's label_names) of the records' labels."""
    return label_index(names, self.of(records, split), f"{split} split")


def label_index(names: list[str], values, where: str) -> np.ndarray:
  """String (or int) labels -> indices into names; an unknown label is a one-line error."""
  index = {n: i for i, n in enumerate(names)}
  bad = sorted({str(v) for v in values} - set(index))
  if bad:
    raise JaxftError(f"{where}: label(s) {bad[:5]} not in the label names {names}")
  return np.array([index[str(v)] for v in values], np.int32)
