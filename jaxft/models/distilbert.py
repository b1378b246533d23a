"""The DistilBERT family (Sanh et al. 2019): a native Flax encoder on the checkpoints' names, outputs equal to
transformers' PyTorch DistilBertModel (tests/models/test_families.py).

BERT's post-norm blocks under DistilBERT's names, `transformer/layer/N/{attention/{q_lin,k_lin,v_lin,out_lin},
sa_layer_norm, ffn/{lin1,lin2}, output_layer_norm}`; word and position embeddings only (no token types; the
sinusoidal variant stores its table like a learned one), LayerNorm epsilon 1e-12, no pooler. Packed rows attend
within their segments.
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.errors import JaxftError
from jaxft.models import bert, hf_checkpoint
from jaxft.models.base import Backbone, Conventions, Found, Opened

NAME = "distilbert"
MODEL_TYPES = ("distilbert",)
TAKES = {}
_QKV, _OUT = r".*/attention/(q_lin|k_lin|v_lin)", r".*/attention/out_lin"
CONVENTIONS = Conventions(
    embeddings=r"(.*/)?embeddings/.*",
    layers=r"(?:.*/)?transformer/layer/",
    tensor_parallel=((_QKV + "/kernel", (None, "tensor")), (_QKV + "/bias", ("tensor",)),
                     (_OUT + "/kernel", ("tensor", None)), (r".*/ffn/lin1/kernel", (None, "tensor")),
                     (r".*/ffn/lin1/bias", ("tensor",)), (r".*/ffn/lin2/kernel", ("tensor", None)),
                     (r".*/word_embeddings/embedding", ("tensor", None))),
    lora={"qv": (r".*/attention/(q_lin|v_lin)/kernel",), "attention": (_QKV + "/kernel", _OUT + "/kernel"),
          "all": (_QKV + "/kernel", _OUT + "/kernel", r".*/ffn/(lin1|lin2)/kernel")},
    no_decay=(r"(.*/)?bias", r".*(LayerNorm|layer_norm)/scale"),
)
EPS = 1e-12  # DistilBERT's LayerNorms (fixed, not in its config)


def claims(found: Found) -> bool:
  return found.model_type in MODEL_TYPES


def open(found: Found) -> Opened:
  config = hf_checkpoint.config_of(found)
  if config.activation not in bert.ACTIVATIONS:
    raise JaxftError(f"{found.path}: jaxft's DistilBERT computes activation in {', '.join(bert.ACTIVATIONS)}, not "
                     f"{config.activation!r}")
  return hf_checkpoint.opened(found, sys.modules[__name__])


def _dense(c, features, dtype, name):
  return nn.Dense(features, dtype=dtype, name=name, kernel_init=jax.nn.initializers.normal(c.initializer_range))


class Attention(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1xQxL, train: bool):
    c = self.config
    H, Dh = c.n_heads, c.dim // c.n_heads

    def heads(name):  # [B, L, D] -> [B, H, L, Dh]
      y = _dense(c, c.dim, self.dtype, name)(x_BxLxD)
      return y.reshape(y.shape[:2] + (H, Dh)).transpose(0, 2, 1, 3)

    q_BxHxLxK = heads("q_lin") / jnp.sqrt(Dh).astype(self.dtype)
    s_BxHxLxL = jnp.einsum("bhqd,bhkd->bhqk", q_BxHxLxK, heads("k_lin")) + bias_Bx1xQxL.astype(self.dtype)
    p_BxHxLxL = jax.nn.softmax(s_BxHxLxL).astype(self.dtype)
    # one [L, L] dropout mask shared by batch and heads, as BERT's (models/bert.py)
    p_BxHxLxL = nn.Dropout(c.attention_dropout, broadcast_dims=(0, 1))(p_BxHxLxL, deterministic=not train)
    o_BxHxLxK = jnp.einsum("bhqk,bhkd->bhqd", p_BxHxLxL, heads("v_lin"))
    return _dense(c, c.dim, self.dtype, "out_lin")(o_BxHxLxK.transpose(0, 2, 1, 3).reshape(x_BxLxD.shape))


class FFN(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, train: bool):
    c = self.config
    h_BxLxF = bert.ACTIVATIONS[c.activation](_dense(c, c.hidden_dim, self.dtype, "lin1")(x_BxLxD))
    return nn.Dropout(c.dropout)(_dense(c, c.dim, self.dtype, "lin2")(h_BxLxF), deterministic=not train)


class Layer(nn.Module):
  """TransformerBlock: LayerNorm(x + attention(x)), then LayerNorm(that + FFN(that))."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1xQxL, train: bool):
    c = self.config
    a_BxLxD = Attention(c, self.dtype, name="attention")(x_BxLxD, bias_Bx1xQxL, train)
    a_BxLxD = nn.LayerNorm(epsilon=EPS, dtype=self.dtype, name="sa_layer_norm")(a_BxLxD + x_BxLxD)
    h_BxLxD = FFN(c, self.dtype, name="ffn")(a_BxLxD, train)
    return nn.LayerNorm(epsilon=EPS, dtype=self.dtype, name="output_layer_norm")(h_BxLxD + a_BxLxD)


class Transformer(nn.Module):
  config: object
  dtype: jnp.dtype
  remat: bool

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1xQxL, train: bool):
    return bert.Layers(self.config, self.dtype, self.remat, Layer, name="layer")(x_BxLxD, bias_Bx1xQxL, train)


class Embeddings(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, ids_BxL, positions_BxL, train: bool):
    c = self.config
    init = jax.nn.initializers.normal(c.initializer_range)
    embed = lambda n, name: nn.Embed(n, c.dim, dtype=self.dtype, embedding_init=init, name=name)  # noqa: E731
    x_BxLxD = embed(c.vocab_size, "word_embeddings")(ids_BxL) + embed(c.max_position_embeddings,
                                                                      "position_embeddings")(positions_BxL)
    x_BxLxD = nn.LayerNorm(epsilon=EPS, dtype=self.dtype, name="LayerNorm")(x_BxLxD)
    return nn.Dropout(c.dropout)(x_BxLxD, deterministic=not train)


class DistilBertModel(nn.Module):
  """(last hidden states [B, L, D], None): transformers' DistilBertModel (it has no pooler)."""
  config: object
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, train: bool = False, positions_BxL=None, segments_BxL=None):
    """segments_BxL (packed rows): example k of a row holds the tokens marked k (0: padding); positions_BxL
    restart at 0 for each."""
    positions_BxL = jnp.arange(ids_BxL.shape[1])[None] if positions_BxL is None else positions_BxL
    x_BxLxD = Embeddings(self.config, self.dtype, name="embeddings")(ids_BxL, positions_BxL, train)
    bias_Bx1xQxL = jnp.where(bert.visibility(mask_BxL, segments_BxL), 0.0, jnp.finfo(self.dtype).min)
    return Transformer(self.config, self.dtype, self.remat, name="transformer")(x_BxLxD, bias_Bx1xQxL, train), None


def load(path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(a Backbone computing jaxft's DistilBERT on the checkpoint's params, a one-line report)."""
  c = config if config is not None else hf_checkpoint.read_config(path)
  module = DistilBertModel(c, jnp.dtype(compute_dtype), mcfg.remat == "block")
  return bert.backbone(path, mcfg, c, module, "distilbert", CONVENTIONS, seed, c.seq_classif_dropout)
