"""The DINOv2 family (Oquab et al. 2023; facebook/dinov2-*): ViT's encoder (models/vit.py) with DINOv2's
deltas, on the checkpoints' names; outputs equal to transformers' PyTorch Dinov2Model (tests/models/test_families.py).

Blocks `encoder/layer/N/{norm1, attention/attention/{query,key,value}, attention/output/dense, layer_scale1,
norm2, mlp, layer_scale2}`: each residual branch scaled per channel (`lambda1`), an MLP `fc1`, `fc2` or
(`use_swiglu_ffn`) a SwiGLU whose `weights_in` holds the gate and the input, in that order; stochastic depth
(`drop_path_rate`) in training. The checkpoints are trained at 518 pixels and used at 224 (their processor's
crop): the model runs at model.image_size, else the crop size of preprocessor_config.json, else the config's
image_size, and its position embeddings are resized to that grid bicubically as PyTorch resizes them
(transformers' interpolate_pos_encoding), inside the model, so the checkpoint's table is what trains and saves.
The pooled output is the class token's final state; `embeddings/mask_token` (masked-image pretraining) is kept
and unused. Tensor parallelism splits the fused `weights_in` as stored (XLA reshards where gate and input
straddle a shard).
"""
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxft import assets
from jaxft.errors import JaxftError
from jaxft.models import bert, hf_checkpoint, vit
from jaxft.models.base import (
  IMAGE_KEYS,
  Backbone,
  Found,
  Opened,
  encoder_conventions,
  image_normalisation,
)

NAME = "dinov2"
MODEL_TYPES = ("dinov2",)
TAKES = {key: IMAGE_KEYS[key] for key in ("image_size",)}
CONVENTIONS = encoder_conventions(
    "attention/attention/query", "attention/attention/key", "attention/attention/value", "attention/output/dense",
    up=r".*/mlp/(?:fc1|weights_in)", down=r".*/mlp/(?:fc2|weights_out)", embeddings_frozen="with_bottom_layers",
    no_decay=(r"(.*/)?bias", r".*/(layernorm|norm\d)/scale", r".*/lambda1",
              r".*/(cls_token|mask_token|position_embeddings)"))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # BitImageProcessor's, as DINOv2's processors set


def claims(found: Found) -> bool:
  return found.model_type in MODEL_TYPES


def open(found: Found) -> Opened:
  config = hf_checkpoint.config_of(found)
  if not config.qkv_bias or config.hidden_act not in bert.ACTIVATIONS:
    raise JaxftError(f"{found.path}: jaxft's DINOv2 computes qkv_bias=true and hidden_act in "
                     f"{', '.join(bert.ACTIVATIONS)}, not this config")
  return Opened(found.path, sys.modules[__name__], config.model_type, config)


def image_size(path, config, asked: int | None) -> int:
  """The side the model runs at: model.image_size, else the processor's crop, else the config's image_size."""
  if asked:
    size = asked
  else:
    pre = path / "preprocessor_config.json"
    crop = assets.json_object(pre).get("crop_size") if pre.is_file() else None
    size = (crop.get("height") if isinstance(crop, dict) else crop) or config.image_size
  if size % config.patch_size:
    raise JaxftError(f"model.image_size={size}: DINOv2 takes sides that are multiples of its patch size "
                     f"({config.patch_size})")
  return size


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in]: PyTorch's bicubic resize (align_corners=False, A = -0.75, edges clamped) as a matrix."""
  A = -0.75
  near = lambda x: ((A + 2) * x - (A + 3)) * x * x + 1  # noqa: E731  |x| <= 1
  far = lambda x: ((A * x - 5 * A) * x + 8 * A) * x - 4 * A  # noqa: E731  1 < |x| < 2
  out = np.zeros((n_out, n_in), np.float64)
  for o in range(n_out):
    src = (o + 0.5) * n_in / n_out - 0.5
    i, t = int(np.floor(src)), src - np.floor(src)
    for k, w in zip(range(i - 1, i + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      out[o, min(max(k, 0), n_in - 1)] += w
  return out.astype(np.float32)


class Embeddings(nn.Module):
  """Patches, the class token and the position embeddings resized to the patch grid."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool):
    c = self.config
    init = nn.initializers.truncated_normal(c.initializer_range)
    x_BxNxD = vit.PatchEmbeddings(c, self.dtype, name="patch_embeddings")(x_BxHxWx3)
    B, N, D = x_BxNxD.shape
    cls_1x1xD = self.param("cls_token", init, (1, 1, D))
    if c.use_mask_token:
      self.param("mask_token", nn.initializers.zeros, (1, D))
    side = c.image_size // c.patch_size
    positions_1xTxD = self.param("position_embeddings", init, (1, side * side + 1, D))
    h, w = x_BxHxWx3.shape[1] // c.patch_size, x_BxHxWx3.shape[2] // c.patch_size
    grid_SxSxD = positions_1xTxD[0, 1:].reshape(side, side, D)
    if (h, w) != (side, side):
      grid_SxSxD = jnp.einsum("hs,stD,wt->hwD", bicubic_matrix(side, h), grid_SxSxD.astype(jnp.float32),
                              bicubic_matrix(side, w))
    positions_TxD = jnp.concatenate([positions_1xTxD[0, :1], grid_SxSxD.reshape(h * w, D)]).astype(self.dtype)
    x_BxTxD = jnp.concatenate([jnp.broadcast_to(cls_1x1xD.astype(self.dtype), (B, 1, D)), x_BxNxD], 1) + positions_TxD
    return nn.Dropout(c.hidden_dropout_prob)(x_BxTxD, deterministic=not train)


class MLP(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name,  # noqa: E731
                                     kernel_init=nn.initializers.normal(c.initializer_range))
    hidden = int(c.hidden_size * c.mlp_ratio)
    if not c.use_swiglu_ffn:
      return dense(c.hidden_size, "fc2")(bert.ACTIVATIONS[c.hidden_act](dense(hidden, "fc1")(x_BxTxD)))
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # two thirds, up to a multiple of 8
    gate_BxTxF, up_BxTxF = jnp.split(dense(2 * hidden, "weights_in")(x_BxTxD), 2, axis=-1)
    return dense(c.hidden_size, "weights_out")(nn.silu(gate_BxTxF) * up_BxTxF)


class LayerScale(nn.Module):
  value: float

  @nn.compact
  def __call__(self, x_BxTxD):
    return x_BxTxD * self.param("lambda1", nn.initializers.constant(self.value), (x_BxTxD.shape[-1],)).astype(
        x_BxTxD.dtype)


class Layer(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD, train: bool):
    c = self.config
    norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
    drop_path = nn.Dropout(c.drop_path_rate, broadcast_dims=(1, 2))  # one draw per example: stochastic depth
    a_BxTxD = vit.Attention(c, self.dtype, name="attention")(norm("norm1")(x_BxTxD), train)
    x_BxTxD = x_BxTxD + drop_path(LayerScale(c.layerscale_value, name="layer_scale1")(a_BxTxD), deterministic=not train)
    m_BxTxD = MLP(c, self.dtype, name="mlp")(norm("norm2")(x_BxTxD))
    return x_BxTxD + drop_path(LayerScale(c.layerscale_value, name="layer_scale2")(m_BxTxD), deterministic=not train)


class Dinov2Model(nn.Module):
  """(last hidden states [B, 1 + N, D] after the final LayerNorm, the class token's [B, D]): Dinov2Model."""
  config: object
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    c = self.config
    x_BxTxD = Embeddings(c, self.dtype, name="embeddings")(x_BxHxWx3.astype(self.dtype), train)
    h_BxTxD = vit.Encoder(c, self.dtype, self.remat, Layer, name="encoder")(x_BxTxD, train)
    h_BxTxD = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layernorm")(h_BxTxD)
    return h_BxTxD, h_BxTxD[:, 0]


def load(path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(a Backbone computing jaxft's DINOv2 on the checkpoint's params, a one-line report)."""
  c = config if config is not None else hf_checkpoint.read_config(path)
  size = image_size(path, c, mcfg.image_size)
  module = Dinov2Model(c, jnp.dtype(compute_dtype), mcfg.remat == "block")
  return vit.backbone(path, mcfg, c, module, seed, size, image_normalisation(path, MEAN, STD), CONVENTIONS)
