"""The ModernBERT family (Warner et al. 2024): a native Flax encoder on the checkpoints' names, outputs equal to
transformers' PyTorch ModernBertModel (tests/models/test_families.py).

Pre-norm blocks `layers/N/{attn_norm, attn/{Wqkv, Wo}, mlp_norm, mlp/{Wi, Wo}}` (layer 0 has no attn_norm: its
input is the embeddings' norm), rotary positions (no position table), a GeGLU MLP (`Wi` holds the input and the
gate, in that order), LayerNorms and Dense layers without biases unless the config asks, and a `final_norm`.
Every `global_attn_every_n_layers`-th layer (0, 3, 6, ...) attends globally with `global_rope_theta`; the
others attend within `local_attention // 2` tokens either side, with `local_rope_theta` (transformers 5 writes
both as `layer_types` and `rope_parameters`). Packed rows attend within their segments. The backbone is pooled as
the checkpoint's classifier was (`classifier_pooling`: ModernBERT-base's is mean).

Tensor parallelism splits the fused Wqkv and Wi along their outputs as they are stored; XLA reshards where
q / k / v or input / gate straddle a shard (correct, with more communication than separate projections).
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import parallel
from jaxft.errors import JaxftError
from jaxft.models import bert, hf_checkpoint, llama
from jaxft.models.base import Backbone, Conventions, Found, Opened

NAME = "modernbert"
MODEL_TYPES = ("modernbert",)
TAKES = {}
FULL, SLIDING = llama.FULL, llama.SLIDING
_QKV, _OUT, _UP, _DOWN = r".*/attn/Wqkv", r".*/attn/Wo", r".*/mlp/Wi", r".*/mlp/Wo"
CONVENTIONS = Conventions(
    embeddings=r"(.*/)?embeddings/.*",
    layers=r"(?:.*/)?layers/",
    tensor_parallel=((_QKV + "/kernel", (None, "tensor")), (_QKV + "/bias", ("tensor",)),
                     (_OUT + "/kernel", ("tensor", None)), (_UP + "/kernel", (None, "tensor")),
                     (_UP + "/bias", ("tensor",)), (_DOWN + "/kernel", ("tensor", None)),
                     (r".*/tok_embeddings/embedding", ("tensor", None))),
    # q, k and v are one fused projection: "qv" adapts it whole, as "attention" does
    lora={"qv": (_QKV + "/kernel",), "attention": (_QKV + "/kernel", _OUT + "/kernel"),
          "all": (_QKV + "/kernel", _OUT + "/kernel", _UP + "/kernel", _DOWN + "/kernel")},
)


def claims(found: Found) -> bool:
  return found.model_type in MODEL_TYPES


def open(found: Found) -> Opened:
  config = hf_checkpoint.config_of(found)
  if config.hidden_activation not in bert.ACTIVATIONS:
    raise JaxftError(f"{found.path}: jaxft's ModernBERT computes hidden_activation in {', '.join(bert.ACTIVATIONS)},"
                     f" not {config.hidden_activation!r}")
  return hf_checkpoint.opened(found, sys.modules[__name__])


def layer_types(config) -> list[str]:
  """Each layer's attention: transformers 5's `layer_types`, else (transformers 4) global every
  `global_attn_every_n_layers`-th layer from 0, sliding between."""
  n = config.num_hidden_layers
  types = getattr(config, "layer_types", None)
  if types:
    return list(types)[:n]
  every = getattr(config, "global_attn_every_n_layers", 1)
  return [FULL if i % every == 0 else SLIDING for i in range(n)]


def rope_frequencies(config, layer_type: str) -> np.ndarray:
  """[Dh / 2] inverse frequencies of a layer's rotary embedding: its theta from transformers 5's
  `rope_parameters`, else transformers 4's `global_rope_theta` / `local_rope_theta` (None: the global one)."""
  params = (getattr(config, "rope_parameters", None) or {}).get(layer_type) or {}
  if params.get("rope_type", "default") != "default":
    raise JaxftError(f"ModernBERT rope_type {params['rope_type']!r}: jaxft computes 'default' only")
  theta = params.get("rope_theta") or (getattr(config, "local_rope_theta", None) if layer_type == SLIDING else None)
  theta = theta or config.global_rope_theta
  dim = config.hidden_size // config.num_attention_heads
  return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def _dense(c, features, bias, dtype, name):
  return nn.Dense(features, use_bias=bias, dtype=dtype, name=name,
                  kernel_init=jax.nn.initializers.truncated_normal(c.initializer_range))


def _norm(c, dtype, name):
  return nn.LayerNorm(epsilon=c.norm_eps, use_bias=c.norm_bias, dtype=dtype, name=name)


class Attention(nn.Module):
  config: object
  dtype: jnp.dtype
  layer_type: str

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1xQxL, positions_BxL, train: bool):
    c = self.config
    H = c.num_attention_heads
    Dh = c.hidden_size // H
    qkv_BxLx3xHxK = _dense(c, 3 * c.hidden_size, c.attention_bias, self.dtype, "Wqkv")(x_BxLxD).reshape(
        x_BxLxD.shape[:2] + (3, H, Dh))
    inv_freq = rope_frequencies(c, self.layer_type)
    q_BxLxHxK, k_BxLxHxK = (llama.rotate(qkv_BxLx3xHxK[:, :, i], positions_BxL, inv_freq) for i in (0, 1))
    s_BxHxLxL = (jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxK, k_BxLxHxK) / jnp.sqrt(Dh).astype(self.dtype)
                 + bias_Bx1xQxL.astype(self.dtype))
    p_BxHxLxL = jax.nn.softmax(s_BxHxLxL.astype(jnp.float32)).astype(self.dtype)
    p_BxHxLxL = nn.Dropout(c.attention_dropout)(p_BxHxLxL, deterministic=not train)
    o_BxLxHxK = jnp.einsum("bhqk,bkhd->bqhd", p_BxHxLxL, qkv_BxLx3xHxK[:, :, 2])
    o_BxLxD = _dense(c, c.hidden_size, c.attention_bias, self.dtype, "Wo")(o_BxLxHxK.reshape(x_BxLxD.shape))
    return nn.Dropout(c.attention_dropout)(o_BxLxD, deterministic=not train)


class MLP(nn.Module):
  """GeGLU: Wo(act(input) * gate), input and gate the two halves of Wi's output."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, train: bool):
    c = self.config
    input_BxLxF, gate_BxLxF = jnp.split(_dense(c, 2 * c.intermediate_size, c.mlp_bias, self.dtype, "Wi")(x_BxLxD), 2,
                                        axis=-1)
    h_BxLxF = nn.Dropout(c.mlp_dropout)(bert.ACTIVATIONS[c.hidden_activation](input_BxLxF) * gate_BxLxF,
                                        deterministic=not train)
    return _dense(c, c.hidden_size, c.mlp_bias, self.dtype, "Wo")(h_BxLxF)


class Layer(nn.Module):
  config: object
  dtype: jnp.dtype
  layer_type: str
  first: bool  # layer 0: no attn_norm (its input is already normalised)

  @nn.compact
  def __call__(self, x_BxLxD, biases: dict, positions_BxL, train: bool):
    c = self.config
    h_BxLxD = x_BxLxD if self.first else _norm(c, self.dtype, "attn_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + Attention(c, self.dtype, self.layer_type, name="attn")(
        h_BxLxD, biases[self.layer_type], positions_BxL, train)
    return x_BxLxD + MLP(c, self.dtype, name="mlp")(_norm(c, self.dtype, "mlp_norm")(x_BxLxD), train)


class Layers(nn.Module):
  config: object
  dtype: jnp.dtype
  remat: bool

  @nn.compact
  def __call__(self, x_BxLxD, biases: dict, positions_BxL, train: bool):
    block = nn.remat(Layer, static_argnums=(4,)) if self.remat else Layer  # train: static
    for i, kind in enumerate(layer_types(self.config)):  # the residual stream stays split by batch
      x_BxLxD = block(self.config, self.dtype, kind, i == 0, name=str(i))(parallel.shard_batch(x_BxLxD), biases,
                                                                          positions_BxL, train)
    return parallel.shard_batch(x_BxLxD)


class Embeddings(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, ids_BxL, train: bool):
    c = self.config
    x_BxLxD = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="tok_embeddings",
                       embedding_init=jax.nn.initializers.truncated_normal(c.initializer_range))(ids_BxL)
    return nn.Dropout(c.embedding_dropout)(_norm(c, self.dtype, "norm")(x_BxLxD), deterministic=not train)


class ModernBertModel(nn.Module):
  """(last hidden states [B, L, D], None): transformers' ModernBertModel (it has no pooler)."""
  config: object
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, train: bool = False, positions_BxL=None, segments_BxL=None):
    """segments_BxL (packed rows): example k of a row holds the tokens marked k (0: padding); positions_BxL
    restart at 0 for each, and the local window counts tokens within the example."""
    c = self.config
    L = ids_BxL.shape[1]
    positions_BxL = jnp.arange(L)[None] if positions_BxL is None else positions_BxL
    visible_Bx1xQxL = bert.visibility(mask_BxL, segments_BxL)
    near_QxL = jnp.abs(jnp.arange(L)[:, None] - jnp.arange(L)[None, :]) <= c.local_attention // 2
    floor = jnp.finfo(self.dtype).min
    biases = {FULL: jnp.where(visible_Bx1xQxL, 0.0, floor), SLIDING: jnp.where(visible_Bx1xQxL & near_QxL, 0.0, floor)}
    x_BxLxD = Embeddings(c, self.dtype, name="embeddings")(ids_BxL, train)
    x_BxLxD = Layers(c, self.dtype, self.remat, name="layers")(x_BxLxD, biases, positions_BxL, train)
    return _norm(c, self.dtype, "final_norm")(x_BxLxD), None


def load(path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(a Backbone computing jaxft's ModernBERT on the checkpoint's params, a one-line report)."""
  c = config if config is not None else hf_checkpoint.read_config(path)
  module = ModernBertModel(c, jnp.dtype(compute_dtype), mcfg.remat == "block")
  return bert.backbone(path, mcfg, c, module, "model", CONVENTIONS, seed, c.classifier_dropout)
