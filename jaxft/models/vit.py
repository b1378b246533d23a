"""The ViT family (Dosovitskiy et al. 2021; google/vit-*; DeiT, Touvron et al. 2021): a native Flax encoder on the
checkpoints' names, outputs equal to transformers' PyTorch ViTModel / DeiTModel (tests/models/test_families.py).

Patches of `patch_size` pixels (one strided convolution, `embeddings/patch_embeddings/projection`), a class
token (DeiT: and a distillation token, `embeddings/distillation_token`) and learned position embeddings
(`embeddings/cls_token`, `embeddings/position_embeddings`), then
pre-norm blocks `encoder/layer/N/{layernorm_before, attention/attention/{query,key,value},
attention/output/dense, layernorm_after, intermediate/dense, output/dense}` (attention computed as BERT's,
models/bert.py) and a final `layernorm`. The pooled output is the class token's final state (as
ViTForImageClassification reads it). Inputs: batch["image"], uint8 [B, H, W, 3] at the checkpoint's
image_size, normalised with its preprocessor_config.json (else mean = std = 0.5, ViT's).
"""
import sys

import flax.linen as nn
import jax.numpy as jnp

from jaxft.errors import JaxftError
from jaxft.models import bert, hf_checkpoint
from jaxft.models.base import (
  IMAGE_KEYS,
  Backbone,
  Found,
  ImageProcessor,
  Opened,
  encoder_conventions,
  image_normalisation,
)

NAME = "vit"
MODEL_TYPES = ("vit", "deit")  # DeiT: ViT with a second, distillation token after the class token
TAKES = {key: IMAGE_KEYS[key] for key in ("image_size",)}
CONVENTIONS = encoder_conventions(
    "attention/attention/query", "attention/attention/key", "attention/attention/value", "attention/output/dense",
    # the patch embedding freezes with the bottom layers (freeze_bottom_layers), not on its own
    embeddings_frozen="with_bottom_layers",
    no_decay=(r"(.*/)?bias", r".*(layernorm\w*)/scale", r".*/(cls_token|distillation_token|position_embeddings)"))
VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults


def claims(found: Found) -> bool:
  return found.model_type in MODEL_TYPES


def open(found: Found) -> Opened:
  config = hf_checkpoint.config_of(found)
  if not getattr(config, "qkv_bias", True) or config.hidden_act not in bert.ACTIVATIONS:
    raise JaxftError(f"{found.path}: jaxft's ViT computes qkv_bias=true and hidden_act in "
                     f"{', '.join(bert.ACTIVATIONS)}, not this config")
  return Opened(found.path, sys.modules[__name__], config.model_type, config)


def _layer_norm(c, dtype, name):
  return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype, name=name)


class PatchEmbeddings(nn.Module):
  """[B, H, W, 3] -> [B, N, D]: one convolution with patch-sized kernels and strides."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxHxWx3):
    c, p = self.config, self.config.patch_size
    x_BxhxwxD = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                        kernel_init=nn.initializers.normal(c.initializer_range), name="projection")(x_BxHxWx3)
    return x_BxhxwxD.reshape(x_BxhxwxD.shape[0], -1, c.hidden_size)


class Embeddings(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool):
    c = self.config
    init = nn.initializers.truncated_normal(c.initializer_range)
    x_BxNxD = PatchEmbeddings(c, self.dtype, name="patch_embeddings")(x_BxHxWx3)
    B, N, D = x_BxNxD.shape
    tokens = ("cls_token", "distillation_token") if c.model_type == "deit" else ("cls_token",)
    first = [jnp.broadcast_to(self.param(t, init, (1, 1, D)).astype(self.dtype), (B, 1, D)) for t in tokens]
    positions_1xTxD = self.param("position_embeddings", init, (1, N + len(tokens), D))
    x_BxTxD = jnp.concatenate([*first, x_BxNxD], 1)
    x_BxTxD = x_BxTxD + positions_1xTxD.astype(self.dtype)
    return nn.Dropout(c.hidden_dropout_prob)(x_BxTxD, deterministic=not train)


class Attention(nn.Module):
  """ViTAttention: BERT's self-attention (`attention`), then its output projection (`output/dense`)."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD, train: bool):
    c = self.config
    a_BxTxD = bert.SelfAttention(c, self.dtype, name="attention")(x_BxTxD, jnp.zeros((1, 1, 1, 1)), train)
    return _Output(c, self.dtype, name="output")(a_BxTxD, train)


class _Output(nn.Module):
  """dense -> dropout (ViTSelfOutput; ViTOutput adds the residual after)."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.config
    y = nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=nn.initializers.normal(c.initializer_range),
                 name="dense")(x)
    return nn.Dropout(c.hidden_dropout_prob)(y, deterministic=not train)


class Layer(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD, train: bool):
    c = self.config
    x_BxTxD = x_BxTxD + Attention(c, self.dtype, name="attention")(
        _layer_norm(c, self.dtype, "layernorm_before")(x_BxTxD), train)
    h_BxTxF = bert.Intermediate(c, self.dtype, name="intermediate")(_layer_norm(c, self.dtype, "layernorm_after")(x_BxTxD))
    return x_BxTxD + _Output(c, self.dtype, name="output")(h_BxTxF, train)


class Encoder(nn.Module):
  """The blocks `layer/N` (ViT's Layer; DINOv2's its own)."""
  config: object
  dtype: jnp.dtype
  remat: bool
  layer: type | None = None

  @nn.compact
  def __call__(self, x_BxTxD, train: bool):
    return bert.Layers(self.config, self.dtype, self.remat, self.layer or Layer, name="layer")(x_BxTxD, train)


class ViTModel(nn.Module):
  """(last hidden states [B, 1 + N, D] after the final LayerNorm, pooled [B, D]): transformers' ViTModel;
  pooled is the class token's state (pooler=True: through the checkpoint's `pooler/dense` and tanh)."""
  config: object
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  add_pooling_layer: bool = False

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    c = self.config
    x_BxTxD = Embeddings(c, self.dtype, name="embeddings")(x_BxHxWx3.astype(self.dtype), train)
    h_BxTxD = _layer_norm(c, self.dtype, "layernorm")(Encoder(c, self.dtype, self.remat, name="encoder")(x_BxTxD, train))
    if not self.add_pooling_layer:
      return h_BxTxD, h_BxTxD[:, 0]
    return h_BxTxD, bert.Pooler(c, self.dtype, name="pooler")(h_BxTxD)


def load(path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(a Backbone computing jaxft's ViT on the checkpoint's params, a one-line report)."""
  c = config if config is not None else hf_checkpoint.read_config(path)
  size = mcfg.image_size or c.image_size
  if size != c.image_size:
    raise JaxftError(f"model.image_size={size}: {path}'s position embeddings are for {c.image_size} x {c.image_size} "
                     f"images (leave model.image_size unset)")
  module = ViTModel(c, jnp.dtype(compute_dtype), mcfg.remat == "block", pooler)
  return backbone(path, mcfg, c, module, seed, size, image_normalisation(path, VIT_MEAN, VIT_STD), CONVENTIONS)


def backbone(path, mcfg, c, module, seed: int, size: int, normalisation: tuple, conventions
             ) -> tuple[Backbone, str]:
  """(the Backbone of a ViT-shaped `module` (pixels, train) -> (hidden, pooled) on checkpoint `path`, run at
  `size` x `size` pixels normalised with `normalisation` (mean, std), a one-line report): ViT's and DINOv2's."""
  pixels = jnp.zeros((1, size, size, c.num_channels), jnp.float32)
  variables, report = hf_checkpoint.variables(path, lambda rng: module.init(rng, pixels), seed, mcfg.weights,
                                              c.model_type)
  mean, std = normalisation

  def apply(params, batch, train=False, rng=None, state=None):
    x_BxHxWx3 = (batch["image"].astype(jnp.float32) / 255 - mean) / std
    dropout = train and rng is not None
    hidden, pooled = module.apply({"params": params}, x_BxHxWx3, dropout, rngs={"dropout": rng} if dropout else {})
    return {"hidden": hidden, "pooled": pooled}, state

  return Backbone(name=str(path), key=c.model_type, params=variables["params"], apply=apply,
                  processor=ImageProcessor(size, tuple(255 * mean.tolist()), tuple(255 * std.tolist())), config=c,
                  conventions=conventions,
                  save=lambda p, out, state=None: hf_checkpoint.save(out, c, {"params": p}, source=path),
                  hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, init_scale=c.initializer_range,
                  head_dropout=0.0, inputs=("image",)), report
