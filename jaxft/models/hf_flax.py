"""The fallback family: any transformers Flax base model (RoBERTa, DistilBERT, ELECTRA, GPT-2, ViT, ResNet...)
computing with transformers' own module, and the union of the known families' path conventions.

Image models (those whose input is `pixel_values`) read batch["image"] (uint8 [B, H, W, 3]), normalised
with the checkpoint's preprocessor_config.json (else ImageNet's mean / std); ViT pools its first token
(as FlaxViTForImageClassification), ResNet its pooler output; ResNet's BatchNorm statistics are model
state, frozen per layer with models.base.frozen_batchnorm."""
import dataclasses
import inspect
import sys

import jax.numpy as jnp

from jaxft import assets
from jaxft.errors import JaxftError
from jaxft.models import base, hf_checkpoint, llama
from jaxft.models.base import (
  Backbone,
  Conventions,
  Found,
  ImageProcessor,
  Opened,
  batchnorm_paths,
  frozen_batchnorm,
  tokenizer_path,
)

CONVENTIONS = Conventions(
    embeddings=r"(.*/)?(embeddings|wte|wpe|embed_tokens)/.*",
    layers=r"(?:.*/)?(?:layer|layers|h|block|blocks)/",
    tensor_parallel=(
        # BERT / RoBERTa / ViT
        (r".*/attention/(self|attention)/(query|key|value)/kernel", (None, "tensor")),
        (r".*/attention/(self|attention)/(query|key|value)/bias", ("tensor",)),
        (r".*/attention/output/dense/kernel", ("tensor", None)),
        (r".*/intermediate/dense/kernel", (None, "tensor")),
        (r".*/intermediate/dense/bias", ("tensor",)),
        (r".*/layer/\d+/output/dense/kernel", ("tensor", None)),
        (r".*/word_embeddings/embedding", ("tensor", None)),
        *llama.CONVENTIONS.tensor_parallel,  # Llama-like families (Mistral, Qwen2, ...): the same names
        # GPT-2 (FlaxConv1D kernels are [out, in])
        (r".*/attn/c_attn/kernel", ("tensor", None)),
        (r".*/attn/c_attn/bias", ("tensor",)),
        (r".*/attn/c_proj/kernel", (None, "tensor")),
        (r".*/mlp/c_fc/kernel", ("tensor", None)),
        (r".*/mlp/c_fc/bias", ("tensor",)),
        (r".*/mlp/c_proj/kernel", (None, "tensor")),
        (r".*/wte/embedding", ("tensor", None)),
    ),
    lora={"qv": (r".*/(query|value|q_proj|v_proj|q_lin|v_lin)/kernel",)},
)
# Image families: the stem / patch embeddings freeze with the bottom layers, not by default.
VISION_CONVENTIONS = {
    "resnet": Conventions(embeddings=r"(.*/)?embedder/.*", embeddings_frozen="with_bottom_layers",
                          layers=r"(?:.*/)?stages/", no_decay=(r"(.*/)?bias", r".*/normalization/scale")),
    "vit": dataclasses.replace(CONVENTIONS, embeddings_frozen="with_bottom_layers"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


NAME = "transformers"
TAKES = base.IMAGE_KEYS  # image models


def open(found: Found) -> Opened:
  return hf_checkpoint.opened(found, sys.modules[__name__])


def load(path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(a Backbone computing with transformers' Flax module for the checkpoint's family, a one-line report)."""
  config = config if config is not None else hf_checkpoint.read_config(path)
  ckpt = hf_checkpoint.load(path, config, pooler, seed, compute_dtype, mcfg.weights, tokenizer_path(mcfg, path))
  return _model(ckpt, mcfg), ckpt.report


def _model(ckpt: hf_checkpoint.Checkpoint, mcfg) -> Backbone:
  model, c = ckpt.model, ckpt.config
  if model.main_input_name == "pixel_values":
    return _image_model(ckpt, mcfg.image_size)
  if mcfg.remat == "block":
    if not hasattr(model, "enable_gradient_checkpointing"):
      raise JaxftError(f"model.remat=block: {type(model).__name__} has no gradient checkpointing")
    model.enable_gradient_checkpointing()
  accepted = set(inspect.signature(model.__call__).parameters)
  inputs = [k for k in ("attention_mask", "token_type_ids") if k in accepted]

  def apply(params, batch, train=False, rng=None, state=None):
    out = model(batch["input_ids"], **{k: batch[k] for k in inputs if k in batch}, params=params,
                dropout_rng=rng, train=train and rng is not None)
    return {"hidden": out.last_hidden_state, "pooled": getattr(out, "pooler_output", None)}, state

  hidden = getattr(c, "hidden_size", None) or getattr(c, "dim", None) or c.n_embd
  layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", None) or getattr(c, "n_layer", 0)
  rate = getattr(c, "classifier_dropout", None)
  rate = rate if rate is not None else getattr(c, "hidden_dropout_prob", getattr(c, "dropout", 0.1))
  return Backbone(name=str(ckpt.path), key=model.base_model_prefix, params=ckpt.params, apply=apply,
                  processor=ckpt.tokenizer, config=c, conventions=CONVENTIONS,
                  save=lambda p, out, state=None: hf_checkpoint.save(ckpt, p, out, state), hidden_size=hidden, num_layers=layers,
                  init_scale=getattr(c, "initializer_range", 0.02), head_dropout=rate,
                  pooling=hf_checkpoint.pooling(ckpt.path))


def _image_model(ckpt: hf_checkpoint.Checkpoint, image_size: int | None) -> Backbone:
  model, c = ckpt.model, ckpt.config
  if c.model_type not in VISION_CONVENTIONS:
    raise JaxftError(f"{ckpt.path}: jaxft knows the image families {', '.join(VISION_CONVENTIONS)}, not "
                     f"{c.model_type!r}")
  pre = ckpt.path / "preprocessor_config.json"
  pre = assets.json_object(pre) if pre.is_file() else {}
  mean = jnp.asarray(pre.get("image_mean", IMAGENET_MEAN), jnp.float32)
  std = jnp.asarray(pre.get("image_std", IMAGENET_STD), jnp.float32)
  size = image_size or getattr(c, "image_size", None) or 224
  has_bn = "batch_stats" in ckpt.params
  params, state = (ckpt.params["params"], {"batch_stats": ckpt.params["batch_stats"]}) if has_bn else (ckpt.params, {})

  def apply(params, batch, train=False, rng=None, state=None, frozen_bn=frozenset()):
    pixels_Bx3xHxW = ((batch["image"].astype(jnp.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
    if not has_bn:  # ViT: dropout only
      out = model(pixels_Bx3xHxW, params=params, dropout_rng=rng, train=train and rng is not None)
      return {"hidden": out.last_hidden_state, "pooled": out.last_hidden_state[:, 0]}, state
    with frozen_batchnorm(frozen_bn):
      out = model(pixels_Bx3xHxW, params={"params": params, **state}, train=train)
    out, state = out if train else (out, state)
    return {"hidden": out.last_hidden_state.transpose(0, 2, 3, 1), "pooled": out.pooler_output[:, :, 0, 0]}, dict(state)

  hidden = getattr(c, "hidden_size", None) or c.hidden_sizes[-1]
  layers = getattr(c, "num_hidden_layers", None) or len(c.depths)
  return Backbone(name=str(ckpt.path), key=model.base_model_prefix, params=params, apply=apply,
                  processor=ImageProcessor(size, tuple(255 * mean.tolist()), tuple(255 * std.tolist())), config=c,
                  conventions=VISION_CONVENTIONS[c.model_type], save=lambda p, out, state=None: hf_checkpoint.save(ckpt, p, out, state),
                  hidden_size=hidden, num_layers=layers, init_scale=getattr(c, "initializer_range", 0.02),
                  head_dropout=0.0, inputs=("image",), state=state,
                  batch_norm=batchnorm_paths(state["batch_stats"]) if has_bn else ())
