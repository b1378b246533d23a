"""The ResNet family (He et al. 2016; microsoft/resnet-*): a native Flax module on the checkpoints' names,
outputs equal to transformers' PyTorch ResNetModel (tests/models/test_resnet.py).

A 7x7 stride-2 stem and 3x3 max pool (`embedder/embedder/{convolution,normalization}`), then stages of basic
(two 3x3) or bottleneck (1x1, 3x3, 1x1) blocks, `encoder/stages/S/layers/L/{layer/K,shortcut}/{convolution,
normalization}`, the first block of a stage striding (and projecting the shortcut) where the shape changes.
Convolutions without bias, BatchNorm (epsilon 1e-5, PyTorch's momentum 0.1) whose statistics are model state
(`batch_stats`, frozen per layer with models.base.frozen_batchnorm), and a global average pool. Inputs:
batch["image"], uint8 [B, H, W, 3], normalised with the checkpoint's preprocessor_config.json (else
ImageNet's mean and std). Freezing: the layers are the stages; the stem freezes with them.
"""
import sys

import flax.linen as nn
import jax.numpy as jnp

from jaxft.errors import JaxftError
from jaxft.models import hf_checkpoint
from jaxft.models.base import (
  IMAGE_KEYS,
  Backbone,
  Conventions,
  Found,
  ImageProcessor,
  Opened,
  batchnorm_paths,
  frozen_batchnorm,
  image_normalisation,
)

NAME = "resnet"
MODEL_TYPES = ("resnet",)
TAKES = IMAGE_KEYS
CONVENTIONS = Conventions(embeddings=r"(.*/)?embedder/.*", embeddings_frozen="with_bottom_layers",
                          layers=r"(?:.*/)?stages/", no_decay=(r"(.*/)?bias", r".*/normalization/scale"))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu, "swish": nn.silu}


def claims(found: Found) -> bool:
  return found.model_type in MODEL_TYPES


def open(found: Found) -> Opened:
  config = hf_checkpoint.config_of(found)
  if config.hidden_act not in ACTIVATIONS or config.layer_type not in ("basic", "bottleneck"):
    raise JaxftError(f"{found.path}: jaxft's ResNet computes hidden_act in {', '.join(ACTIVATIONS)} and basic or "
                     f"bottleneck layers, not {config.hidden_act!r} / {config.layer_type!r}")
  return Opened(found.path, sys.modules[__name__], config.model_type, config)


class ConvLayer(nn.Module):
  """convolution (no bias, `kernel // 2` padding) -> BatchNorm -> activation (None: none)."""
  features: int
  kernel: int = 3
  stride: int = 1
  activation: str | None = "relu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    k, pad = self.kernel, self.kernel // 2
    x = nn.Conv(self.features, (k, k), strides=(self.stride,) * 2, padding=[(pad, pad)] * 2, use_bias=False,
                dtype=self.dtype, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                name="convolution")(x_BxHxWxC)
    x = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="normalization")(
        x, use_running_average=not train)  # at call time: frozen_batchnorm overrides it per layer
    return x if self.activation is None else ACTIVATIONS[self.activation](x)


class Convs(nn.Module):
  """A block's convolutions, `layer/0`, `layer/1`, ...: (features, kernel, stride, activation) each."""
  convs: tuple
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    for i, (features, kernel, stride, activation) in enumerate(self.convs):
      x = ConvLayer(features, kernel, stride, activation, self.dtype, name=str(i))(x, train)
    return x


class Block(nn.Module):
  """A basic or bottleneck residual block (ResNetBasicLayer / ResNetBottleNeckLayer)."""
  config: object
  features: int
  stride: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    c, out, stride, act = self.config, self.features, self.stride, self.config.hidden_act
    residual = x_BxHxWxC
    if x_BxHxWxC.shape[-1] != out or stride != 1:
      residual = ConvLayer(out, 1, stride, None, self.dtype, name="shortcut")(x_BxHxWxC, train)
    if c.layer_type == "basic":
      convs = ((out, 3, stride, act), (out, 3, 1, None))
    else:
      first = stride if c.downsample_in_bottleneck else 1
      convs = ((out // 4, 1, first, act), (out // 4, 3, stride // first, act), (out, 1, 1, None))
    return ACTIVATIONS[act](Convs(convs, self.dtype, name="layer")(x_BxHxWxC, train) + residual)


class Blocks(nn.Module):
  """A stage's blocks, `layers/0`, `layers/1`, ...; the first strides by `stride`."""
  config: object
  features: int
  depth: int
  stride: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.depth):
      x = Block(self.config, self.features, self.stride if i == 0 else 1, self.dtype, name=str(i))(x, train)
    return x


class Stage(nn.Module):
  config: object
  features: int
  depth: int
  stride: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    return Blocks(self.config, self.features, self.depth, self.stride, self.dtype, name="layers")(x, train)


class Stages(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.config
    for s, (features, depth) in enumerate(zip(c.hidden_sizes, c.depths)):
      stride = 2 if s > 0 or c.downsample_in_first_stage else 1
      x = Stage(c, features, depth, stride, self.dtype, name=str(s))(x, train)
    return x


class Encoder(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    return Stages(self.config, self.dtype, name="stages")(x, train)


class Embedder(nn.Module):
  """The stem: a 7x7 stride-2 convolution layer (`embedder`), then a 3x3 stride-2 max pool."""
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool):
    c = self.config
    x = ConvLayer(c.embedding_size, 7, 2, c.hidden_act, self.dtype, name="embedder")(x_BxHxWx3, train)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNetModel(nn.Module):
  """(last hidden states [B, h, w, C], pooled [B, C]): transformers' ResNetModel, channels last."""
  config: object
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    x = Embedder(self.config, self.dtype, name="embedder")(x_BxHxWx3.astype(self.dtype), train)
    x_BxhxwxC = Encoder(self.config, self.dtype, name="encoder")(x, train)
    return x_BxhxwxC, jnp.mean(x_BxhxwxC.astype(jnp.float32), axis=(1, 2)).astype(x_BxhxwxC.dtype)


def load(path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(a Backbone computing jaxft's ResNet on the checkpoint's params and statistics, a one-line report)."""
  c = config if config is not None else hf_checkpoint.read_config(path)
  module = ResNetModel(c, jnp.dtype(compute_dtype))
  size = mcfg.image_size or 224
  pixels = jnp.zeros((1, 32, 32, c.num_channels), jnp.float32)
  variables, report = hf_checkpoint.variables(path, lambda rng: module.init(rng, pixels), seed, mcfg.weights,
                                              "resnet")
  mean, std = image_normalisation(path, IMAGENET_MEAN, IMAGENET_STD)

  def apply(params, batch, train=False, rng=None, state=None, frozen_bn=frozenset()):
    x_BxHxWx3 = (batch["image"].astype(jnp.float32) / 255 - mean) / std
    variables = {"params": params, **state}
    if not train:
      hidden, pooled = module.apply(variables, x_BxHxWx3, False)
      return {"hidden": hidden, "pooled": pooled}, state
    with frozen_batchnorm(frozen_bn):
      (hidden, pooled), new = module.apply(variables, x_BxHxWx3, True, mutable=["batch_stats"])
    return {"hidden": hidden, "pooled": pooled}, {"batch_stats": new["batch_stats"]}

  state = {"batch_stats": variables["batch_stats"]}
  return Backbone(name=str(path), key="resnet", params=variables["params"], apply=apply,
                  processor=ImageProcessor(size, tuple(255 * mean.tolist()), tuple(255 * std.tolist())), config=c,
                  conventions=CONVENTIONS,
                  save=lambda p, out, state: hf_checkpoint.save(out, c, {"params": p, **state}, source=path),
                  hidden_size=c.hidden_sizes[-1], num_layers=len(c.depths), init_scale=0.02, head_dropout=0.0,
                  inputs=("image",), state=state, batch_norm=batchnorm_paths(state["batch_stats"])), report
