"""The backbone provider contract: what a model family gives the task, the rules and the step.

A provider module (bert.py, hf_flax.py, efficientnet.py, ...) exports `load(...) -> Backbone` and its
family's `CONVENTIONS`. The task adds its head under its own key beside `Backbone.key`.
"""
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class Conventions:
  """A family's param-path conventions, used by the freeze shorthands, layer decay, TP and LoRA."""
  # Regex (full match) of the embedding params (a CNN: its stem); None for a family without them.
  embeddings: str | None
  # Regex prefix that, followed by `(\\d+)/`, names transformer block i (e.g. `(?:.*/)?encoder/layer/`).
  layers: str
  # Ordered (regex, PartitionSpec tuple) Megatron-style tensor-parallel rules.
  tensor_parallel: tuple = ()
  # LoRA target presets: name -> regexes over Dense kernel paths.
  lora: dict = dataclasses.field(default_factory=dict)
  # Params that take no weight decay (biases, normalisation scales).
  no_decay: tuple = (r"(.*/)?bias", r".*(LayerNorm|layer_norm|ln_\w+|norm\w*)/(scale|weight)")
  # When freeze_embeddings is unset, the embeddings are frozen "always" (an encoder's embedding table),
  # "with_bottom_layers" (a CNN's stem: when freeze_bottom_layers > 0) or "never" (a causal LM's, tied to
  # its output layer).
  embeddings_frozen: str = "always"


@dataclasses.dataclass
class Backbone:
  """A loaded pretrained model without a task head.

  apply(params, batch, train, rng, state[, frozen_bn]) -> ({"hidden": [B, L, D], "pooled": [B, D] or None
  [, "logits": [B, L, V] for causal LMs]}, state): `params` is the subtree at `key`; train: training mode; rng: the dropout key (None: no dropout);
  `state` is mutable model state (BatchNorm statistics), {} if none; frozen_bn: for families with
  BatchNorm (`batch_norm` lists its layers), the layers that keep their running statistics in training.
  """
  name: str  # where it was loaded from
  key: str  # the params subtree it owns, e.g. "bert"
  params: Any
  apply: Callable
  processor: Any  # the tokenizer (or image preprocessing)
  config: Any  # the family's config object
  conventions: Conventions
  save: Callable  # save(params, out_dir, state): a directory `load` (and the family's home library) reads back
  hidden_size: int
  num_layers: int
  init_scale: float  # stddev for new head kernels
  head_dropout: float  # dropout rate before a new head
  pooling: str = "cls"  # what the checkpoint was trained to be pooled by: "cls" | "mean"
  inputs: tuple = ("input_ids", "attention_mask", "token_type_ids")  # the batch fields apply reads
  packs: bool = False  # apply takes packed rows (segment_ids, position_ids: data/packing.py)
  state: Any = dataclasses.field(default_factory=dict)
  batch_norm: tuple = ()  # paths of the BatchNorm layers ('blocks/3/bn1'), for apply's frozen_bn
  forward_flops: float | None = None  # image models: analytic forward FLOPs of one example (None: 6N * tokens)
  # Causal LMs (apply also returns "logits"): (batch, length) -> an empty KV cache; apply, given state
  # {"cache": ...}, writes the new tokens at its index and returns it advanced (generation).
  new_cache: Callable | None = None


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """An image model's input: size x size RGB pixels (0-255), normalised on the device as (x - mean) / std."""
  size: int
  mean: tuple
  std: tuple


def tokenizer_path(mcfg, weights_path):
  """Where the tokenizer is read from: model.tokenizer, else beside the weights."""
  from jaxft import assets
  return assets.resolve(mcfg.tokenizer) if mcfg.tokenizer else weights_path


def max_positions(config) -> int | None:
  """The longest input a family's config has position embeddings for (None: not bounded by a table)."""
  return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def frozen_batchnorm(frozen: frozenset):
  """A context in which every flax BatchNorm whose module path ('blocks/3/bn1', relative to the applied
  module) is in `frozen` normalises with, and keeps, its running statistics, even in training: one
  mechanism for jaxft's modules and transformers' alike (a method interceptor; no module knows)."""
  if not frozen:
    return contextlib.nullcontext()

  def interceptor(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__"
        and "/".join(context.module.path) in frozen):
      kwargs = {**kwargs, "use_running_average": True}
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def batchnorm_paths(stats) -> tuple:
  """The module paths of the BatchNorm layers in a batch_stats tree (the parents of its `mean` leaves)."""
  from flax import traverse_util
  return tuple("/".join(p[:-1]) for p in traverse_util.flatten_dict(stats) if p[-1] == "mean")
