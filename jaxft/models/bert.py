"""The BERT family (BERT, RoBERTa, XLM-RoBERTa): jaxft's encoder on the checkpoints' names, and its conventions.

Module and param names are the checkpoints' (`encoder/layer/3/attention/self/query/kernel`, ...), so the
same checkpoints load, save and take LoRA adapters, and outputs equal transformers' PyTorch BertModel /
RobertaModel (tests/models/test_bert.py). RoBERTa and XLM-RoBERTa differ from BERT only in their position
ids, which start after the padding id (`padding_idx + 1`), and their prefix (`roberta.`). On speed:
queries, keys and values go to head-major [B, H, L, Dh] before the two attention matmuls, which XLA
runs as plain batched matmuls (about 2x faster on CPU than transformers' [B, L, H, Dh] einsums;
benchmarks/NOTES.md). Attention dropout is one [L, L] mask shared by batch and heads, as in
transformers' Flax BERT.
"""
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft import parallel
from jaxft.errors import JaxftError
from jaxft.models import hf_checkpoint
from jaxft.models.base import Backbone, Found, Opened, encoder_conventions, tokenizer_path

CONVENTIONS = encoder_conventions("attention/self/query", "attention/self/key", "attention/self/value",
                                  "attention/output/dense", words="word_embeddings")

ACTIVATIONS = {"gelu": functools.partial(nn.gelu, approximate=False),
               "gelu_new": functools.partial(nn.gelu, approximate=True),
               "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
               "relu": nn.relu, "silu": nn.silu, "swish": nn.silu}


NAME = "bert"
TAKES = {}
PREFIX = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}  # model_type -> the base model's name
MODEL_TYPES = tuple(PREFIX)


def claims(found: Found) -> bool:
  """A Hugging Face BERT, RoBERTa or XLM-RoBERTa directory."""
  return found.model_type in MODEL_TYPES


def open(found: Found) -> Opened:
  config = hf_checkpoint.config_of(found)
  unsupported = unsupported_by(config)
  if unsupported:
    raise JaxftError(f"{found.path}: jaxft's {config.model_type} encoder does not compute {unsupported}")
  return hf_checkpoint.opened(found, sys.modules[__name__])


def unsupported_by(config) -> str | None:
  """What of `config` this encoder does not compute as transformers does (None: it computes all of it)."""
  if config.hidden_act not in ACTIVATIONS:
    return f"hidden_act {config.hidden_act!r} (known: {', '.join(ACTIVATIONS)})"
  if getattr(config, "position_embedding_type", "absolute") != "absolute":
    return f"position_embedding_type {config.position_embedding_type!r} (absolute only)"
  if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
    return "a decoder (is_decoder / add_cross_attention)"
  return None


def position_offset(config) -> int:
  """What the first token's position id is: 0, or RoBERTa's padding id + 1."""
  return 0 if config.model_type == "bert" else config.pad_token_id + 1


def max_length(config) -> int:
  """The longest input the position embeddings cover (RoBERTa's first ids are taken by its offset)."""
  return config.max_position_embeddings - position_offset(config)


def visibility(mask_BxL, segments_BxL=None):
  """[B, 1, Q, L] which keys each query sees: the real tokens (mask), or, in packed rows (segments: example k's
  tokens marked k, 0 padding), the real tokens of its own example. BERT's, and its kin's."""
  if segments_BxL is None:
    return (mask_BxL > 0)[:, None, None, :]
  return ((segments_BxL[:, :, None] == segments_BxL[:, None, :]) & (segments_BxL[:, None, :] > 0))[:, None]


def _dense(config, features, dtype, name):
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=jax.nn.initializers.normal(config.initializer_range))


def _layer_norm(config, dtype, name):
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name=name)


class Embeddings(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, ids_BxL, types_BxL, positions_BxL, train: bool):
    c = self.config
    init = jax.nn.initializers.normal(c.initializer_range)
    embed = lambda n, name: nn.Embed(n, c.hidden_size, embedding_init=init, dtype=self.dtype, name=name)  # noqa: E731
    x_BxLxD = (embed(c.vocab_size, "word_embeddings")(ids_BxL)
               + embed(c.type_vocab_size, "token_type_embeddings")(types_BxL)
               + embed(c.max_position_embeddings, "position_embeddings")(positions_BxL))
    x_BxLxD = _layer_norm(c, self.dtype, "LayerNorm")(x_BxLxD)
    return nn.Dropout(c.hidden_dropout_prob)(x_BxLxD, deterministic=not train)


class SelfAttention(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1xQxL, train: bool):
    c = self.config
    H = c.num_attention_heads
    Dh = c.hidden_size // H

    def heads(name):  # [B, L, D] -> [B, H, L, Dh]
      y = _dense(c, c.hidden_size, self.dtype, name)(x_BxLxD)
      return y.reshape(y.shape[:2] + (H, Dh)).transpose(0, 2, 1, 3)

    q_BxHxLxK = heads("query") / jnp.sqrt(Dh).astype(self.dtype)
    k_BxHxLxK, v_BxHxLxK = heads("key"), heads("value")
    s_BxHxLxL = jnp.einsum("bhqd,bhkd->bhqk", q_BxHxLxK, k_BxHxLxK) + bias_Bx1xQxL.astype(self.dtype)
    p_BxHxLxL = jax.nn.softmax(s_BxHxLxL).astype(self.dtype)
    rate = c.attention_probs_dropout_prob
    if train and rate > 0:
      keep_LxL = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, p_BxHxLxL.shape[-2:])
      p_BxHxLxL = p_BxHxLxL * (keep_LxL.astype(self.dtype) / jnp.asarray(1.0 - rate, self.dtype))
    o_BxHxLxK = jnp.einsum("bhqk,bhkd->bhqd", p_BxHxLxL, v_BxHxLxK)
    return o_BxHxLxK.transpose(0, 2, 1, 3).reshape(x_BxLxD.shape)


class Residual(nn.Module):
  """dense -> dropout -> LayerNorm(+ residual): transformers' BertSelfOutput and BertOutput."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, residual_BxLxD, train: bool):
    c = self.config
    y_BxLxD = _dense(c, c.hidden_size, self.dtype, "dense")(x)
    y_BxLxD = nn.Dropout(c.hidden_dropout_prob)(y_BxLxD, deterministic=not train)
    return _layer_norm(c, self.dtype, "LayerNorm")(y_BxLxD + residual_BxLxD)


class Attention(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1xQxL, train: bool):
    a_BxLxD = SelfAttention(self.config, self.dtype, name="self")(x_BxLxD, bias_Bx1xQxL, train)
    return Residual(self.config, self.dtype, name="output")(a_BxLxD, x_BxLxD, train)


class Intermediate(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.config
    return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, self.dtype, "dense")(x_BxLxD))


class Layer(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1xQxL, train: bool):
    a_BxLxD = Attention(self.config, self.dtype, name="attention")(x_BxLxD, bias_Bx1xQxL, train)
    h_BxLxF = Intermediate(self.config, self.dtype, name="intermediate")(a_BxLxD)
    return Residual(self.config, self.dtype, name="output")(h_BxLxF, a_BxLxD, train)


class Layers(nn.Module):
  """The blocks `0`, `1`, ... of an encoder (BERT's, MPNet's, ViT's `layer`: its class), each given the residual
  stream and `rest` (train last); remat: each recomputed in the backward pass."""
  config: object
  dtype: jnp.dtype
  remat: bool
  layer: type | None = None  # None: BERT's Layer

  @nn.compact
  def __call__(self, x_BxLxD, *rest):
    layer = self.layer or Layer
    block = nn.remat(layer, static_argnums=(len(rest) + 1,)) if self.remat else layer  # train: static
    for i in range(self.config.num_hidden_layers):  # the residual stream stays split by batch (parallel.shard_batch)
      x_BxLxD = block(self.config, self.dtype, name=str(i))(parallel.shard_batch(x_BxLxD), *rest)
    return parallel.shard_batch(x_BxLxD)


class Encoder(nn.Module):
  config: object
  dtype: jnp.dtype
  remat: bool

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1xQxL, train: bool):
    return Layers(self.config, self.dtype, self.remat, name="layer")(x_BxLxD, bias_Bx1xQxL, train)


class Pooler(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h_BxLxD):
    return jnp.tanh(_dense(self.config, self.config.hidden_size, self.dtype, "dense")(h_BxLxD[:, 0]))


class BertModel(nn.Module):
  """(last hidden states [B, L, D], pooled [B, D] or None): transformers' BertModel / RobertaModel."""
  config: object
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, types_BxL=None, train: bool = False, positions_BxL=None, segments_BxL=None):
    """segments_BxL (packed rows): example k of a row holds the tokens marked k (0: padding); attention stays
    inside an example, and positions_BxL restart at 0 for each."""
    c = self.config
    types_BxL = jnp.zeros_like(ids_BxL) if types_BxL is None else types_BxL
    positions_BxL = jnp.arange(ids_BxL.shape[1])[None] if positions_BxL is None else positions_BxL
    offset = position_offset(c)
    if offset:  # RoBERTa: tokens from padding_idx + 1, padding at padding_idx (as create_position_ids_from_input_ids)
      real_BxL = (mask_BxL > 0) if segments_BxL is None else (segments_BxL > 0)
      positions_BxL = jnp.where(real_BxL, positions_BxL + offset, offset - 1)
    x_BxLxD = Embeddings(c, self.dtype, name="embeddings")(ids_BxL, types_BxL, positions_BxL, train)
    bias_Bx1xQxL = jnp.where(visibility(mask_BxL, segments_BxL), 0.0, jnp.finfo(self.dtype).min)
    h_BxLxD = Encoder(c, self.dtype, self.remat, name="encoder")(x_BxLxD, bias_Bx1xQxL, train)
    return h_BxLxD, Pooler(c, self.dtype, name="pooler")(h_BxLxD) if self.add_pooling_layer else None


def backbone(path, mcfg, c, module, key: str, conventions, seed: int, head_dropout: float, types: bool = False
             ) -> tuple[Backbone, str]:
  """(the Backbone of a text encoder `module` on checkpoint `path` (its variables under `key`), a one-line
  report): BERT's and its kin's, which take (ids, mask[, types], train, positions, segments) and pack rows;
  types: it reads token_type_ids."""
  ids = jnp.zeros((1, 2), jnp.int32)
  variables, report = hf_checkpoint.variables(path, lambda rng: module.init(rng, ids, ids + 1), seed, mcfg.weights,
                                              key)
  tokenizer = hf_checkpoint.tokenizer(path, tokenizer_path(mcfg, path))

  def apply(params, batch, train=False, rng=None, state=None):
    dropout = train and rng is not None  # no BatchNorm: training mode is dropout only
    token_types = {"types_BxL": batch.get("token_type_ids")} if types else {}
    hidden, pooled = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], train=dropout,
                                  positions_BxL=batch.get("position_ids"), segments_BxL=batch.get("segment_ids"),
                                  rngs={"dropout": rng} if dropout else {}, **token_types)
    return {"hidden": hidden, "pooled": pooled}, state

  return Backbone(name=str(path), key=key, params=variables["params"], apply=apply, processor=tokenizer,
                  config=c, conventions=conventions,
                  save=lambda p, out, state=None: hf_checkpoint.save(out, c, {"params": p}, tokenizer),
                  hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, init_scale=c.initializer_range,
                  head_dropout=head_dropout, pooling=hf_checkpoint.pooling(path, c), packs=True,
                  inputs=("input_ids", "attention_mask", *(("token_type_ids",) if types else ()), "position_ids",
                          "segment_ids")), report


def load(path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(a Backbone computing with jaxft's encoder on the checkpoint's params, a one-line report)."""
  c = config if config is not None else hf_checkpoint.read_config(path)
  module = BertModel(c, jnp.dtype(compute_dtype), mcfg.remat == "block", add_pooling_layer=pooler)
  rate = c.classifier_dropout if getattr(c, "classifier_dropout", None) is not None else c.hidden_dropout_prob
  return backbone(path, mcfg, c, module, PREFIX[c.model_type], CONVENTIONS, seed, rate, types=True)
