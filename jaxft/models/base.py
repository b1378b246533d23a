"""The backbone provider contract: what a model family gives the task, the rules and the step.

A provider module (bert.py, hf_flax.py, ...) exports `load(path, cfg, pooler, log) -> Backbone` and its
family's `CONVENTIONS`. The task adds its head under its own key beside `Backbone.key`.
"""
import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Conventions:
  """A family's param-path conventions, used by the freeze shorthands, layer decay, TP and LoRA."""
  # Regex (full match) of the embedding params; None for a family without an embedding table.
  embeddings: str | None
  # Regex prefix that, followed by `(\\d+)/`, names transformer block i (e.g. `(?:.*/)?encoder/layer/`).
  layers: str
  # Ordered (regex, PartitionSpec tuple) Megatron-style tensor-parallel rules.
  tensor_parallel: tuple = ()
  # LoRA target presets: name -> regexes over Dense kernel paths.
  lora: dict = dataclasses.field(default_factory=dict)
  # Params that take no weight decay (biases, normalisation scales).
  no_decay: tuple = (r"(.*/)?bias", r".*(LayerNorm|layer_norm|ln_\w+|norm\w*)/(scale|weight)")


@dataclasses.dataclass
class Backbone:
  """A loaded pretrained model without a task head.

  apply(params, batch, train, rng, state) -> ({"hidden": [B, L, D], "pooled": [B, D] or None}, state):
  `params` is the subtree at `key`; `state` is mutable model state (BatchNorm statistics), {} if none.
  """
  name: str  # where it was loaded from
  key: str  # the params subtree it owns, e.g. "bert"
  params: Any
  apply: Callable
  processor: Any  # the tokenizer (or image preprocessing)
  config: Any  # the family's config object
  conventions: Conventions
  save: Callable  # save(params, out_dir): a directory `load` (and the family's home library) reads back
  hidden_size: int
  num_layers: int
  init_scale: float  # stddev for new head kernels
  head_dropout: float  # dropout rate before a new head
  pooling: str = "cls"  # what the checkpoint was trained to be pooled by: "cls" | "mean"
  inputs: tuple = ("input_ids", "attention_mask", "token_type_ids")  # the batch fields apply reads
  packs: bool = False  # apply takes packed rows (segment_ids, position_ids: data/packing.py)
  state: Any = dataclasses.field(default_factory=dict)


def max_positions(config) -> int | None:
  """The longest input a family's config has position embeddings for (None: not bounded by a table)."""
  return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
