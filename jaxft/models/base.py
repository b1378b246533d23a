"""The backbone provider contract: what a model family gives the task, the rules and the step.

A family module (bert.py, llama.py, vit.py, ...) claims checkpoints (`Found`), describes
one before it loads (`Opened`) and loads it into a `Backbone` (jaxft/models/__init__.py lists the contract).
The task adds its head under its own key beside `Backbone.key`.
"""
import contextlib
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn

from jaxft import assets


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


def encoder_conventions(q: str, k: str, v: str, out: str, words: str | None = None,
                        up: str = r".*/intermediate/dense", down: str = r".*/layer/\d+/output/dense", **more
                        ) -> Conventions:
  """The conventions of a BERT-shaped encoder (`encoder/layer/N/`: attention with projections at paths ending
  in q, k, v and out; MLP projections at paths matching up and down), as Megatron shards it: column-parallel
  q / k / v and up-projection, row-parallel out and down projections, the `words` embedding sharded by
  vocabulary. LoRA presets: qv, attention (q, k, v, out), all (and the MLP). `more`: other Conventions fields."""
  qkv, attn_out = rf".*/(?:{q}|{k}|{v})", rf".*/{out}"
  return Conventions(
      embeddings=more.pop("embeddings", r"(.*/)?embeddings/.*"), layers=r"(?:.*/)?encoder/layer/",
      tensor_parallel=((qkv + "/kernel", (None, "tensor")), (qkv + "/bias", ("tensor",)),
                       (attn_out + "/kernel", ("tensor", None)), (up + "/kernel", (None, "tensor")),
                       (up + "/bias", ("tensor",)), (down + "/kernel", ("tensor", None)),
                       *(((rf".*/{words}/embedding", ("tensor", None)),) if words else ())),
      lora={"qv": (rf".*/(?:{q}|{v})/kernel",), "attention": (qkv + "/kernel", attn_out + "/kernel"),
            "all": (qkv + "/kernel", attn_out + "/kernel", up + "/kernel", down + "/kernel")},
      **more)


def image_normalisation(path: Path, mean: tuple, std: tuple):
  """(mean, std) of an image checkpoint's inputs in [0, 1]: its preprocessor_config.json's, else these."""
  import jax.numpy as jnp
  pre = path / "preprocessor_config.json"
  pre = assets.json_object(pre) if pre.is_file() else {}
  return (jnp.asarray(pre.get("image_mean", mean), jnp.float32), jnp.asarray(pre.get("image_std", std), jnp.float32))


@dataclasses.dataclass
class Found:
  """What model.name resolved to, as the families' claims see it; each fact is read once, when first asked."""
  path: Path

  @functools.cached_property
  def model_type(self) -> str | None:
    """A directory's config.json `model_type` (None: a file, or no config.json; an invalid one is an error)."""
    config = self.path / "config.json"
    return assets.json_object(config).get("model_type") if config.is_file() else None

  def once(self, name: str, read: Callable):
    """read(), the first time `name` is asked of this checkpoint (a family's own fact: its config)."""
    facts = self.__dict__.setdefault("_facts", {})
    if name not in facts:
      facts[name] = read()
    return facts[name]

  @functools.cached_property
  def weights(self) -> tuple[dict, str]:
    """(weights, kind) of a bare weights file (jaxft.formats.read)."""
    from jaxft import formats
    return formats.read(self.path)


@dataclasses.dataclass
class Opened:
  """A checkpoint claimed by its family and described before its weights load: the task asks `pooling`, the
  data its `max_length`, then `load` builds the Backbone."""
  path: Path
  family: Any  # the family module
  model_type: str
  config: Any = None  # what open read, passed back to load (the family's config; a bare file's weights)
  max_length: int | None = None  # the longest input its position embeddings cover (None: unbounded)
  pooling: str = "cls"  # how it was trained to be pooled: "cls" | "mean" (sentence-transformers)

  def check_length(self, length: int, what: str) -> None:
    """Inputs of `length` tokens (set by `what`, a key) must fit the position embeddings."""
    from jaxft.errors import JaxftError
    if self.max_length and length > self.max_length:
      raise JaxftError(f"{what}={length} is longer than {self.path} has position embeddings for ({self.max_length})")

  def load(self, mcfg, seed: int, compute_dtype: str = "float32", pooler: bool = False, log=print,
           platform: str = "cpu") -> "Backbone":
    """The Backbone; platform: what its programs are compiled for ('cpu', 'gpu', 'tpu'), where a family
    computes differently per platform."""
    backbone, report = self.family.load(self.path, mcfg, compute_dtype, seed, platform, pooler, self.config)
    log(f"loaded {self.model_type} from {self.path} (jaxft's {self.family.NAME} module): {report}")
    return backbone


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
  # (flat params {path: array}, batch, length, trained paths or None: all) -> analytic FLOPs of one training
  # step (bench's MFU); None: a token model's, token_flops
  train_flops: Callable | None = None
  # Causal LMs (apply also returns "logits"): (batch, length) -> an empty KV cache; apply, given state
  # {"cache": ...}, writes the new tokens at its index and returns it advanced (generation).
  new_cache: Callable | None = None
  # model.quantize=gguf: () -> {module path in params: quantized leaves} of the checkpoint's own blocks (quantize.py)
  kept_blocks: Callable | None = None

  def __post_init__(self):
    if self.train_flops is None:
      self.train_flops = functools.partial(token_flops, self.config)


def token_flops(config, params: dict, batch: int, length: int, trained=None, tied_output: bool = False) -> float:
  """A token model's training step: per token 2 (forward) + 2 (gradients of the activations) + 2 (of the
  weights) FLOPs per matmul param, the last only for `trained` params (None: all: 6N), + attention (QK^T
  and AV, forward and backward: 12 * L * B * S^2 * D). tied_output: the embedding table is also the output
  layer's matmul (a causal LM's tied head). A LoRA or partly frozen step does no weight gradients for its
  frozen matmuls."""
  matmul = {p: x.size for p, x in params.items() if x.ndim == 2 and "embedding" not in p}
  n_matmul = sum(matmul.values())
  n_trained = n_matmul if trained is None else sum(n for p, n in matmul.items() if p in trained)
  if tied_output:
    tied = config.vocab_size * config.hidden_size
    n_matmul += tied
    n_trained += tied if trained is None or any("embedding" in p for p in trained) else 0
  layers = getattr(config, "num_hidden_layers", 0)
  hidden = getattr(config, "hidden_size", 0)
  return (4 * n_matmul + 2 * n_trained) * batch * length + 12 * layers * batch * length ** 2 * hidden


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


# The model.* keys of the image families (efficientnet, transformers' image models): (check, error), as TAKES
IMAGE_KEYS = {
    "image_size": (lambda v, cfg: v >= 8, "must be >= 8 pixels"),
    "bn": (lambda v, cfg: v in ("train", "frozen"), "must be train or frozen"),
}


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
