"""The MPNet family (Song et al. 2020; all-mpnet-base-v2, the sentence-transformers default): a native Flax
encoder on the checkpoints' names, outputs equal to transformers' PyTorch MPNetModel (tests/models/
test_families.py).

BERT's post-norm blocks (models/bert.py's intermediate and output layers) with MPNet's own attention,
`encoder/layer/N/attention/{attn/{q,k,v,o}, LayerNorm}`, and a T5-style relative position bias shared by
every layer (`encoder/relative_attention_bias`: 32 buckets of the distance, per head); no token types;
position ids start after the padding id 1 (as RoBERTa's). Packed rows attend within their segments.
"""
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.errors import JaxftError
from jaxft.models import bert, hf_checkpoint
from jaxft.models.base import Backbone, Found, Opened, encoder_conventions

NAME = "mpnet"
MODEL_TYPES = ("mpnet",)
TAKES = {}
PADDING = 1  # MPNetEmbeddings' padding_idx (fixed, whatever the config's pad_token_id)
CONVENTIONS = encoder_conventions("attention/attn/q", "attention/attn/k", "attention/attn/v", "attention/attn/o",
                                  words="word_embeddings")


def claims(found: Found) -> bool:
  return found.model_type in MODEL_TYPES


def open(found: Found) -> Opened:
  config = hf_checkpoint.config_of(found)
  if config.hidden_act not in bert.ACTIVATIONS:
    raise JaxftError(f"{found.path}: jaxft's MPNet computes hidden_act in {', '.join(bert.ACTIVATIONS)}, not "
                     f"{config.hidden_act!r}")
  return hf_checkpoint.opened(found, sys.modules[__name__])


def max_length(config) -> int:
  return config.max_position_embeddings - PADDING - 1


def bucket(relative_LxL, buckets: int = 32, max_distance: int = 128):
  """MPNet's (T5's bidirectional) bucket of each relative position (key - query): half the buckets per
  direction, exact up to a quarter of them, then logarithmic up to max_distance."""
  half = buckets // 2
  n = -relative_LxL
  out = (n < 0).astype(jnp.int32) * half
  n = jnp.abs(n)
  exact = half // 2
  large = exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
                   * (half - exact)).astype(jnp.int32)
  return out + jnp.where(n < exact, n, jnp.minimum(large, half - 1))


class SelfAttention(nn.Module):
  """q, k, v, o with the relative position bias and the padding / segment bias added to the scores."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, bias_BxHxQxL, train: bool):
    c = self.config
    H, Dh = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, name=name,  # noqa: E731
                                  kernel_init=jax.nn.initializers.normal(c.initializer_range))

    def heads(name):  # [B, L, D] -> [B, H, L, Dh]
      y = dense(name)(x_BxLxD)
      return y.reshape(y.shape[:2] + (H, Dh)).transpose(0, 2, 1, 3)

    q_BxHxLxK = heads("q") / jnp.sqrt(Dh).astype(self.dtype)
    s_BxHxLxL = jnp.einsum("bhqd,bhkd->bhqk", q_BxHxLxK, heads("k")) + bias_BxHxQxL.astype(self.dtype)
    p_BxHxLxL = jax.nn.softmax(s_BxHxLxL).astype(self.dtype)
    # one [L, L] dropout mask shared by batch and heads, as BERT's (models/bert.py)
    p_BxHxLxL = nn.Dropout(c.attention_probs_dropout_prob, broadcast_dims=(0, 1))(p_BxHxLxL, deterministic=not train)
    o_BxHxLxK = jnp.einsum("bhqk,bhkd->bhqd", p_BxHxLxL, heads("v"))
    return dense("o")(o_BxHxLxK.transpose(0, 2, 1, 3).reshape(x_BxLxD.shape))


class Attention(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, bias_BxHxQxL, train: bool):
    c = self.config
    a_BxLxD = SelfAttention(c, self.dtype, name="attn")(x_BxLxD, bias_BxHxQxL, train)
    a_BxLxD = nn.Dropout(c.hidden_dropout_prob)(a_BxLxD, deterministic=not train)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(a_BxLxD + x_BxLxD)


class Layer(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, bias_BxHxQxL, train: bool):
    a_BxLxD = Attention(self.config, self.dtype, name="attention")(x_BxLxD, bias_BxHxQxL, train)
    h_BxLxF = bert.Intermediate(self.config, self.dtype, name="intermediate")(a_BxLxD)
    return bert.Residual(self.config, self.dtype, name="output")(h_BxLxF, a_BxLxD, train)


class Encoder(nn.Module):
  config: object
  dtype: jnp.dtype
  remat: bool

  @nn.compact
  def __call__(self, x_BxLxD, visible_Bx1xQxL, train: bool):
    c = self.config
    L = x_BxLxD.shape[1]
    relative = nn.Embed(c.relative_attention_num_buckets, c.num_attention_heads, dtype=self.dtype,
                        embedding_init=jax.nn.initializers.normal(c.initializer_range), name="relative_attention_bias")
    position_LxLxH = relative(bucket(jnp.arange(L)[None, :] - jnp.arange(L)[:, None]))
    bias_BxHxQxL = (position_LxLxH.transpose(2, 0, 1)[None]
                    + jnp.where(visible_Bx1xQxL, 0.0, jnp.finfo(self.dtype).min).astype(self.dtype))
    return bert.Layers(c, self.dtype, self.remat, Layer, name="layer")(x_BxLxD, bias_BxHxQxL, train)


class Embeddings(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, ids_BxL, positions_BxL, train: bool):
    c = self.config
    init = jax.nn.initializers.normal(c.initializer_range)
    embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, embedding_init=init, name=name)  # noqa: E731
    x_BxLxD = embed(c.vocab_size, "word_embeddings")(ids_BxL) + embed(c.max_position_embeddings,
                                                                      "position_embeddings")(positions_BxL)
    x_BxLxD = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x_BxLxD)
    return nn.Dropout(c.hidden_dropout_prob)(x_BxLxD, deterministic=not train)


class MPNetModel(nn.Module):
  """(last hidden states [B, L, D], pooled [B, D] or None): transformers' MPNetModel."""
  config: object
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, train: bool = False, positions_BxL=None, segments_BxL=None):
    """segments_BxL (packed rows): example k of a row holds the tokens marked k (0: padding); positions_BxL
    restart at 0 for each (the padding offset is added here)."""
    c = self.config
    real_BxL = (mask_BxL > 0) if segments_BxL is None else (segments_BxL > 0)
    positions_BxL = jnp.arange(ids_BxL.shape[1])[None] if positions_BxL is None else positions_BxL
    positions_BxL = jnp.where(real_BxL, positions_BxL + PADDING + 1, PADDING)
    x_BxLxD = Embeddings(c, self.dtype, name="embeddings")(ids_BxL, positions_BxL, train)
    h_BxLxD = Encoder(c, self.dtype, self.remat, name="encoder")(x_BxLxD, bert.visibility(mask_BxL, segments_BxL), train)
    return h_BxLxD, bert.Pooler(c, self.dtype, name="pooler")(h_BxLxD) if self.add_pooling_layer else None


def load(path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(a Backbone computing jaxft's MPNet on the checkpoint's params, a one-line report)."""
  c = config if config is not None else hf_checkpoint.read_config(path)
  module = MPNetModel(c, jnp.dtype(compute_dtype), mcfg.remat == "block", add_pooling_layer=pooler)
  return bert.backbone(path, mcfg, c, module, "mpnet", CONVENTIONS, seed, c.hidden_dropout_prob)
