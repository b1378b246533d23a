"""The Llama family (Llama 2 / 3, SmolLM, TinyLlama, ...; Mistral, Qwen2 / 2.5, Qwen3, Gemma 1 / 2 / 3): a native
Flax causal LM on transformers' param names. What each variant changes is its `Variant` (and its layers'
`layer_types`): Mistral a sliding attention window in every layer; Qwen2 biases on q / k / v; Qwen3 q / k norms
and sliding layers where `layer_types` says; Gemma (1 + weight) RMSNorms, scaled embeddings and GeGLU; Gemma 2
sandwich norms, alternating sliding layers and soft-capped scores and logits; Gemma 3 q / k norms and its own
rotary theta for its sliding layers.

RMSNorm, rotary position embeddings (the checkpoint's theta; "linear" and "llama3" scaling), grouped-query
attention through `jax.nn.dot_product_attention` (XLA on CPU, cuDNN's fused kernel where it applies),
SwiGLU MLP, tied or untied output embeddings. The backbone's params are FlaxLlamaForCausalLM's tree
(`model/layers/3/self_attn/q_proj/kernel`, `lm_head/kernel`; no lm_head when tied), so checkpoints load,
save and take LoRA adapters by their Hugging Face names; logits equal transformers' (tests/models/test_llama.py).

Inputs: `input_ids` [B, L], `attention_mask` (padding), or, packed, `segment_ids` with `position_ids` that
restart for each document: attention stays causal and inside a segment. Generation passes a KV cache
(`new_cache`) as the model state: apply writes the new tokens' keys and values at the cache's index and
returns the cache advanced.

Checkpoints: a Hugging Face directory (config.json with model_type llama; safetensors, PyTorch pickles or
Flax msgpack) or a GGUF file (formats/gguf.py: dequantised; llama_gguf.py: its names and config, llama.cpp's q/k permutation undone, the
tokenizer from its metadata unless a tokenizer.json lies beside it). `save` writes a Hugging Face
directory (model.safetensors in PyTorch names) that transformers' PyTorch and Flax classes load.
"""
import copy
import dataclasses
import functools
import math
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import formats, parallel
from jaxft.errors import JaxftError
from jaxft.models import llama_gguf, splash
from jaxft.models.base import Backbone, Conventions, Found, Opened, token_flops, tokenizer_path

NAME = MODEL_TYPE = "llama"
# the decoders this module computes; what each changes is its Variant
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
TAKES = {  # the model.* keys only this family takes: (the check of a value set, the error if it fails)
    "scan_layers": (lambda v, cfg: not (v and (cfg.lora.targets or cfg.lora.preset)),
                    "does not take LoRA adapters yet (they are found per block); set model.scan_layers=false"),
    "layers": (lambda v, cfg: cfg.model.weights == "shapes" and v >= 1,
               "sets a depth of model.weights=shapes models only (>= 1)"),
    "attention": (lambda v, cfg: v in ("auto", "xla"), "must be auto or xla"),
}
_ATTN, _MLP = r".*/self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel", r".*/mlp/(gate_proj|up_proj|down_proj)/kernel"
CONVENTIONS = Conventions(
    embeddings=r"(.*/)?embed_tokens/.*",
    layers=r"(?:.*/)?layers/",
    # Megatron: column-parallel q/k/v, gate and up; row-parallel o and down; the vocab sharded.
    tensor_parallel=(
        (r".*/self_attn/(q_proj|k_proj|v_proj)/kernel", (None, "tensor")),
        (r".*/self_attn/o_proj/kernel", ("tensor", None)),
        (r".*/mlp/(gate_proj|up_proj)/kernel", (None, "tensor")),
        (r".*/mlp/down_proj/kernel", ("tensor", None)),
        (r".*/embed_tokens/embedding", ("tensor", None)),
        (r"(.*/)?lm_head/kernel", (None, "tensor")),
    ),
    lora={"qv": (r".*/self_attn/(q_proj|v_proj)/kernel",), "attention": (_ATTN,), "all": (_ATTN, _MLP)},
    no_decay=(r"(.*/)?bias", r".*(norm|layernorm)/weight"),
    # A causal LM's embeddings are trained by default (tied, they are also its output layer).
    embeddings_frozen="never",
)
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
               "gelu": functools.partial(nn.gelu, approximate=False)}
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types


@dataclasses.dataclass(frozen=True)
class Variant:
  """What a decoder computes differently from Llama, read from its config once (variant(config))."""
  gemma: bool = False  # RMSNorm scales by (1 + weight), in float32; embeddings scaled by sqrt(hidden_size)
  post_norms: bool = False  # Gemma 2 / 3: the attention and MLP outputs normalised too (sandwich norms)
  qk_norm: bool = False  # Qwen3, Gemma 3: each head's queries and keys RMS-normalised before the rotation
  qkv_bias: bool = False  # Qwen2 (always), `attention_bias` (Llama, Qwen3, ...)
  o_bias: bool = False
  scale: float | None = None  # queries' scale (Gemma: query_pre_attn_scalar ** -0.5); None: head_dim ** -0.5
  attn_softcap: float | None = None  # Gemma 2: scores -> tanh(scores / cap) * cap
  final_softcap: float | None = None  # Gemma 2: the same on the logits


def variant(config) -> Variant:
  t = config.model_type
  bias = bool(getattr(config, "attention_bias", False))
  gemma = t.startswith("gemma")
  pre_attn = getattr(config, "query_pre_attn_scalar", None)
  return Variant(gemma=gemma, post_norms=t in ("gemma2", "gemma3_text"), qk_norm=t in ("qwen3", "gemma3_text"),
                 qkv_bias=bias or t == "qwen2", o_bias=bias, scale=pre_attn ** -0.5 if gemma and pre_attn else None,
                 attn_softcap=getattr(config, "attn_logit_softcapping", None) if gemma else None,
                 final_softcap=getattr(config, "final_logit_softcapping", None) if gemma else None)


def activation(config) -> str:
  """The MLP's activation (Gemma's config calls it hidden_activation)."""
  return getattr(config, "hidden_activation", None) or config.hidden_act


def supports(config) -> bool:
  """True for configs this module computes exactly like transformers' PyTorch models."""
  return activation(config) in ACTIVATIONS and all(rope(config, t)["rope_type"] in ROPE_TYPES for t in (FULL, SLIDING))


def rope(config, layer_type: str = FULL) -> dict:
  """The rotary embedding's parameters {"rope_theta", "rope_type", and its scaling's} for a layer of
  `layer_type`: transformers 5's `rope_parameters` (Gemma 3: one per layer type), or transformers 4's
  `rope_theta` and `rope_scaling` (Gemma 3: `rope_local_base_freq` for its sliding layers, unscaled)."""
  params = getattr(config, "rope_parameters", None)
  if params and isinstance(params.get(layer_type), dict):
    params = params[layer_type]
  elif params and isinstance(params.get(FULL), dict):  # per layer type, and this type has none of its own
    params = params[FULL]
  elif not params:
    if layer_type == SLIDING and getattr(config, "rope_local_base_freq", None):
      params = {"rope_theta": config.rope_local_base_freq}
    else:
      params = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": config.rope_theta}
  return {**params, "rope_type": params.get("rope_type", params.get("type")) or "default"}


def rope_frequencies(config, layer_type: str = FULL) -> np.ndarray:
  """[Dh / 2] inverse frequencies of the rotary embedding, with the config's scaling."""
  dim = head_dim(config)
  scaling = rope(config, layer_type)
  inv = 1.0 / (scaling["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  kind = scaling["rope_type"]
  if kind == "linear":
    return inv / scaling["factor"]
  if kind == "llama3":  # transformers' _compute_llama3_parameters
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def layer_types(config) -> list[str]:
  """Each layer's attention, FULL or SLIDING: the config's `layer_types` (transformers 5 writes it); else
  Mistral's every layer where it has a window, Gemma 2's even layers, Gemma 3's all but every sixth."""
  n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
  types = getattr(config, "layer_types", None)
  if types:
    return list(types)[:n] + [FULL] * (n - len(types))
  if config.model_type == "mistral" and window:
    return [SLIDING] * n
  if config.model_type == "gemma2":
    return [SLIDING if i % 2 == 0 else FULL for i in range(n)]
  if config.model_type == "gemma3_text":
    pattern = getattr(config, "sliding_window_pattern", 6)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
  return [FULL] * n


def windows(config) -> list:
  """Each layer's sliding attention window (None: full causal attention)."""
  return [config.sliding_window if t == SLIDING else None for t in layer_types(config)]


def head_dim(config) -> int:
  return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotate(x_BxLxNxH, positions_BxL, inv_freq):
  """Rotary embedding of x at its positions (transformers' rotate_half convention)."""
  angles_BxLxH = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  angles_BxLxH = jnp.concatenate([angles_BxLxH, angles_BxLxH], -1)[:, :, None, :]
  cos, sin = jnp.cos(angles_BxLxH).astype(x_BxLxNxH.dtype), jnp.sin(angles_BxLxH).astype(x_BxLxNxH.dtype)
  half = x_BxLxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxLxNxH[..., half:], x_BxLxNxH[..., :half]], -1)
  return x_BxLxNxH * cos + rotated * sin


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  gemma: bool = False  # Gemma's: x * (1 + weight), in float32 (its weight starts at 0)

  @nn.compact
  def __call__(self, x_BxLxD):
    weight = self.param("weight", nn.initializers.zeros if self.gemma else nn.initializers.ones, (x_BxLxD.shape[-1],))
    x = x_BxLxD.astype(jnp.float32)
    x = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
    if self.gemma:
      return (x * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)
    return weight.astype(self.dtype) * x.astype(self.dtype)


def _dense(config, features, dtype, name, bias=False):
  return nn.Dense(features, use_bias=bias, dtype=dtype, name=name,
                  kernel_init=jax.nn.initializers.normal(config.initializer_range))


def _norm(config, dtype, name):
  return RMSNorm(config.rms_norm_eps, dtype, variant(config).gemma, name=name)


def _softcapped_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible_Bx1xLxS, scale: float, cap: float):
  """Attention with Gemma 2's score capping (tanh(s / cap) * cap), which XLA's fused attention lacks."""
  N, K = q_BxLxNxH.shape[2], k_BxSxKxH.shape[2]
  k_BxSxNxH, v_BxSxNxH = (jnp.repeat(x, N // K, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
  s_BxNxLxS = jnp.einsum("blnh,bsnh->bnls", q_BxLxNxH, k_BxSxNxH).astype(jnp.float32) * scale
  s_BxNxLxS = jnp.where(visible_Bx1xLxS, jnp.tanh(s_BxNxLxS / cap) * cap, jnp.finfo(jnp.float32).min)
  p_BxNxLxS = jax.nn.softmax(s_BxNxLxS, axis=-1).astype(q_BxLxNxH.dtype)
  return jnp.einsum("bnls,bsnh->blnh", p_BxNxLxS, v_BxSxNxH)


class Attention(nn.Module):
  config: object
  dtype: jnp.dtype
  layer_type: str = FULL  # FULL or SLIDING (Gemma 3's sliding layers rotate with their own theta)
  window: int | None = None  # sliding-window attention: each token sees itself and the window - 1 before it

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, visible, cache):
    """visible: key lengths [B] for padded rows (causal), segment ids [B, L] (causal within each; the splash
    kernel), else a bool mask [B, 1, L, S]. cache: None, or this layer's {"k", "v"} [B, S, K, H] and the slot
    `index` where the L new tokens go (`visible` over S slots)."""
    c, v = self.config, variant(self.config)
    N, K, H = c.num_attention_heads, c.num_key_value_heads, head_dim(c)
    B, L, _ = x_BxLxD.shape
    q_BxLxNxH = _dense(c, N * H, self.dtype, "q_proj", v.qkv_bias)(x_BxLxD).reshape(B, L, N, H)
    k_BxLxKxH = _dense(c, K * H, self.dtype, "k_proj", v.qkv_bias)(x_BxLxD).reshape(B, L, K, H)
    v_BxLxKxH = _dense(c, K * H, self.dtype, "v_proj", v.qkv_bias)(x_BxLxD).reshape(B, L, K, H)
    if v.qk_norm:
      q_BxLxNxH, k_BxLxKxH = _norm(c, self.dtype, "q_norm")(q_BxLxNxH), _norm(c, self.dtype, "k_norm")(k_BxLxKxH)
    inv_freq = rope_frequencies(c, self.layer_type)
    q_BxLxNxH, k_BxLxKxH = rotate(q_BxLxNxH, positions_BxL, inv_freq), rotate(k_BxLxKxH, positions_BxL, inv_freq)
    first = 0 if cache is None else cache["index"]  # the slot of the first new token
    if cache is not None:
      at = (0, first, 0, 0)
      k_BxSxKxH = jax.lax.dynamic_update_slice(cache["k"], k_BxLxKxH.astype(cache["k"].dtype), at)
      v_BxSxKxH = jax.lax.dynamic_update_slice(cache["v"], v_BxLxKxH.astype(cache["v"].dtype), at)
      cache = {"k": k_BxSxKxH, "v": v_BxSxKxH}
      k_BxLxKxH, v_BxLxKxH = k_BxSxKxH.astype(self.dtype), v_BxSxKxH.astype(self.dtype)
    scale = v.scale or H ** -0.5
    if visible.ndim == 2:  # segment ids (TPU): the splash kernel (models without a window or capping: load says)
      o_BxLxNxH = splash.attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, visible)
    elif visible.ndim == 1 and v.attn_softcap is None:  # padded rows: causal, keys up to each row's length
      o_BxLxNxH = jax.nn.dot_product_attention(
          q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, scale=scale, is_causal=True, key_value_seq_lengths=visible,
          local_window_size=None if self.window is None else (self.window - 1, 0))
    else:
      if visible.ndim == 1:  # (capped scores) the padded rows' causal mask, spelled out
        visible = (jnp.tril(jnp.ones((L, L), bool))[None] & (jnp.arange(L)[None, None, :] < visible[:, None, None]))[:, None]
      if self.window is not None:  # query slot q sees key slots k > q - window
        q_L, k_S = first + jnp.arange(L), jnp.arange(visible.shape[-1])
        visible = visible & (q_L[:, None] - k_S[None, :] < self.window)
      if v.attn_softcap is None:
        o_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, scale=scale, mask=visible)
      else:
        o_BxLxNxH = _softcapped_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, visible, scale, v.attn_softcap)
    out = _dense(c, c.hidden_size, self.dtype, "o_proj", v.o_bias)(o_BxLxNxH.reshape(B, L, N * H))
    return out, cache


class MLP(nn.Module):
  config: object
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD):
    c, bias = self.config, getattr(self.config, "mlp_bias", False)
    gate_BxLxF = _dense(c, c.intermediate_size, self.dtype, "gate_proj", bias)(x_BxLxD)
    up_BxLxF = _dense(c, c.intermediate_size, self.dtype, "up_proj", bias)(x_BxLxD)
    return _dense(c, c.hidden_size, self.dtype, "down_proj", bias)(ACTIVATIONS[activation(c)](gate_BxLxF) * up_BxLxF)


class Layer(nn.Module):
  config: object
  dtype: jnp.dtype
  layer_type: str = FULL  # Attention's

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, visible, cache):
    c = self.config
    window = c.sliding_window if self.layer_type == SLIDING else None
    a_BxLxD, cache = Attention(c, self.dtype, self.layer_type, window, name="self_attn")(
        _norm(c, self.dtype, "input_layernorm")(x_BxLxD), positions_BxL, visible, cache)
    if not variant(c).post_norms:  # Llama: post_attention_layernorm is the MLP's input norm
      x_BxLxD = x_BxLxD + a_BxLxD
      return x_BxLxD + MLP(c, self.dtype, name="mlp")(_norm(c, self.dtype, "post_attention_layernorm")(x_BxLxD)), cache
    x_BxLxD = x_BxLxD + _norm(c, self.dtype, "post_attention_layernorm")(a_BxLxD)
    h_BxLxD = MLP(c, self.dtype, name="mlp")(_norm(c, self.dtype, "pre_feedforward_layernorm")(x_BxLxD))
    return x_BxLxD + _norm(c, self.dtype, "post_feedforward_layernorm")(h_BxLxD), cache


class Layers(nn.Module):
  """The blocks, params `layers/0`, `layers/1`, ... (transformers' names). scan (model.scan_layers), in training
  and evaluation: their params stacked and the blocks run as one jax.lax.scan body, which compiles once
  instead of once per block (the TPU compiler takes minutes on a deep model's unrolled step). It costs a copy
  of the blocks' params in the step, and the backward pass then computes every block's gradients, frozen
  ones too."""
  config: object
  dtype: jnp.dtype
  remat: bool
  scan: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, visible, caches):
    if self.scan and caches is None and not self.is_initializing():
      return self.scanned(x_BxLxD, positions_BxL, visible), None
    block = nn.remat(Layer) if self.remat else Layer
    out = []
    for i in range(self.config.num_hidden_layers):
      x_BxLxD, cache = block(self.config, self.dtype, layer_types(self.config)[i], name=str(i))(
          parallel.shard_batch(x_BxLxD), positions_BxL, visible, None if caches is None else caches[i])
      out.append(cache)
    x_BxLxD = parallel.shard_batch(x_BxLxD)
    return x_BxLxD, None if caches is None else out

  def scanned(self, x_BxLxD, positions_BxL, visible):
    n, layers = self.config.num_hidden_layers, self.variables["params"]
    # every block param is used in the compute dtype (Dense and RMSNorm cast it): cast before stacking, so that
    # the stacked copy and its gradient are half the size in bf16, with the same values and gradients
    stacked = jax.tree.map(lambda *xs: jnp.stack([x.astype(self.dtype) for x in xs]), *[layers[str(i)] for i in range(n)])
    layer = Layer(self.config, self.dtype, layer_types(self.config)[0], parent=None)  # (load: one type for all)

    def body(x_BxLxD, params):
      return parallel.shard_batch(layer.apply({"params": params}, x_BxLxD, positions_BxL, visible, None)[0]), None

    return jax.lax.scan(jax.checkpoint(body) if self.remat else body, parallel.shard_batch(x_BxLxD), stacked)[0]


class Model(nn.Module):
  """transformers' FlaxLlamaModule: ids -> final-norm hidden states [B, L, D] (and the KV caches)."""
  config: object
  dtype: jnp.dtype
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, ids_BxL, positions_BxL, visible, caches=None):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens",
                     embedding_init=jax.nn.initializers.normal(c.initializer_range))
    x_BxLxD = embed(ids_BxL)
    if variant(c).gemma:  # Gemma scales its embeddings (not its tied output layer) by sqrt(hidden_size)
      x_BxLxD = x_BxLxD * jnp.asarray(c.hidden_size ** 0.5, self.dtype)
    x_BxLxD, caches = Layers(c, self.dtype, self.remat, self.scan, name="layers")(x_BxLxD, positions_BxL, visible,
                                                                                  caches)
    return _norm(c, self.dtype, "norm")(x_BxLxD), caches, embed


class CausalLM(nn.Module):
  """transformers' FlaxLlamaForCausalLMModule: (hidden [B, L, D], logits [B, L, V] in float32, caches);
  with `logit_positions` [B, P], the logits [B, P, V] at those positions only."""
  config: object
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  scan: bool = False  # Layers.scan

  @nn.compact
  def __call__(self, ids_BxL, positions_BxL, visible, caches=None, logit_positions_BxP=None):
    h_BxLxD, caches, embed = Model(self.config, self.dtype, self.remat, self.scan, name="model")(
        ids_BxL, positions_BxL, visible, caches)
    h_BxPxD = (h_BxLxD if logit_positions_BxP is None else
               jnp.take_along_axis(h_BxLxD, logit_positions_BxP[..., None], axis=1))
    if self.config.tie_word_embeddings:
      logits_BxPxV = embed.attend(h_BxPxD)
    else:
      logits_BxPxV = _dense(self.config, self.config.vocab_size, self.dtype, "lm_head")(h_BxPxD)
    logits_BxPxV, cap = logits_BxPxV.astype(jnp.float32), variant(self.config).final_softcap
    return h_BxLxD, logits_BxPxV if cap is None else jnp.tanh(logits_BxPxV / cap) * cap, caches


def visibility(batch: dict, segments: bool = False):
  """What attends to what in a training / evaluation batch: packed rows (segment_ids) a [B, 1, L, L] mask,
  causal and inside each segment; padded rows (attention_mask): their lengths [B] (causal attention).
  segments: segment ids [B, L] for the splash kernel instead (packed rows' own, 0 for padding; padded rows: 1
  for tokens, 0 for padding). `branch_ids` [B, L] (with segment_ids) make each segment a tree: a token of
  branch b > 0 sees its segment's shared tokens (branch 0) and its own branch's, never a sibling's (DPO's
  chosen and rejected answers after one prompt); the splash kernel has no such mask, so XLA attends."""
  if segments and "branch_ids" not in batch:
    ids_BxL = batch["input_ids"]
    segments_BxL = batch.get("segment_ids", batch.get("attention_mask"))
    return (jnp.ones_like(ids_BxL) if segments_BxL is None else segments_BxL).astype(jnp.int32)
  if "segment_ids" in batch:
    seg_BxL = batch["segment_ids"]
    L = seg_BxL.shape[1]
    visible_BxLxL = (seg_BxL[:, :, None] == seg_BxL[:, None, :]) & jnp.tril(jnp.ones((L, L), bool))
    if "branch_ids" in batch:
      branch_BxL = batch["branch_ids"]
      visible_BxLxL &= (branch_BxL[:, None, :] == 0) | (branch_BxL[:, :, None] == branch_BxL[:, None, :])
    return visible_BxLxL[:, None]
  mask_BxL = batch.get("attention_mask")
  lengths_B = (jnp.full(batch["input_ids"].shape[:1], batch["input_ids"].shape[1], jnp.int32) if mask_BxL is None
               else mask_BxL.sum(-1).astype(jnp.int32))
  return lengths_B


def new_cache(config, batch: int, length: int, dtype=jnp.float32) -> dict:
  """An empty KV cache of `length` slots per row: what apply reads (as its state) when generating."""
  shape = (batch, length, config.num_key_value_heads, head_dim(config))
  return {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, length), bool),
          "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                     for _ in range(config.num_hidden_layers)]}


def _decode_visibility(cache, mask_BxL):
  """([B, 1, L, S] mask, the cache's validity with them) for L new tokens written at the cache's index:
  each sees the valid slots up to its own."""
  index, valid_BxS = cache["index"], cache["valid"]
  B, L = mask_BxL.shape
  S = valid_BxS.shape[1]
  valid_BxS = jax.lax.dynamic_update_slice(valid_BxS, mask_BxL.astype(bool), (0, index))
  slot_LxS = (jnp.arange(S)[None, :] <= index + jnp.arange(L)[:, None])
  return (valid_BxS[:, None, :] & slot_LxS[None])[:, None], valid_BxS


def make_apply(module, kernel: bool = False):
  """Backbone.apply: ({"hidden", "logits", "pooled": None}, state); state {"cache": ...} while generating.
  kernel: training and evaluation attend with the splash kernel (TPU) where its tiles fit (models/splash.py)."""

  def apply(params, batch, train=False, rng=None, state=None):
    ids_BxL = batch["input_ids"]
    use_splash = kernel and splash.fits(ids_BxL.shape[1], head_dim(module.config))
    positions_BxL = batch.get("position_ids")
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)
    cache = (state or {}).get("cache")
    if cache is None:
      hidden, logits, _ = module.apply({"params": params}, ids_BxL, positions_BxL, visibility(batch, use_splash),
                                       logit_positions_BxP=batch.get("logit_positions"))
      return {"hidden": hidden, "logits": logits, "pooled": None}, state
    visible, valid = _decode_visibility(cache, batch.get("attention_mask", jnp.ones_like(ids_BxL)))
    layers = [{**layer, "index": cache["index"]} for layer in cache["layers"]]
    hidden, logits, layers = module.apply({"params": params}, ids_BxL, positions_BxL, visible, layers,
                                          logit_positions_BxP=batch.get("logit_positions"))
    cache = {"index": cache["index"] + ids_BxL.shape[1], "valid": valid, "layers": layers}
    return {"hidden": hidden, "logits": logits, "pooled": None}, {**state, "cache": cache}

  return apply


# ---- checkpoints -------------------------------------------------------------------------------------------


def claims(found: Found) -> bool:
  """A GGUF file, or a Hugging Face Llama, Mistral, Qwen2 or Qwen3 directory."""
  return found.path.suffix == ".gguf" or found.model_type in MODEL_TYPES


def open(found: Found) -> Opened:
  config = read_config(found.path)
  return Opened(found.path, sys.modules[__name__], config.model_type, config, config.max_position_embeddings)


def read_config(path: Path):
  """transformers' config of a checkpoint (a GGUF file: from its metadata)."""
  import transformers
  if path.suffix == ".gguf":
    return llama_gguf.config(path)
  try:
    return transformers.AutoConfig.from_pretrained(path)
  except (OSError, ValueError, KeyError) as e:
    raise JaxftError(f"could not read {path / 'config.json'}: {str(e).splitlines()[0]}") from None


def _tokenizer(path: Path):
  import transformers
  directory = path.parent if path.suffix == ".gguf" else path
  try:
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
      return transformers.AutoTokenizer.from_pretrained(directory)
    if path.suffix == ".gguf":
      from jaxft.formats import gguf
      return gguf.tokenizer(path)
    return transformers.AutoTokenizer.from_pretrained(directory)
  except (OSError, ValueError, KeyError) as e:
    raise JaxftError(f"could not load the tokenizer of {path}: {str(e).splitlines()[0]}") from None


def from_torch_names(weights: dict) -> dict:
  """{flat Flax path: array} of FlaxLlamaForCausalLM from PyTorch state-dict names ([out, in] -> [in, out])."""
  out = {}
  for name, x in weights.items():
    if name.endswith("rotary_emb.inv_freq"):
      continue
    parts = name.split(".")
    leaf = parts[-1]
    if parts[-2] == "embed_tokens":
      out["/".join(parts[:-1] + ["embedding"])] = x
    elif leaf == "weight" and np.ndim(x) == 2:
      out["/".join(parts[:-1] + ["kernel"])] = np.ascontiguousarray(np.transpose(x))
    else:
      out["/".join(parts)] = x
  return out


def to_torch_names(flat: dict) -> dict:
  """The inverse of from_torch_names: PyTorch names, [out, in] weights, contiguous."""
  out = {}
  for path, x in flat.items():
    parts = path.split("/")
    x = np.asarray(x)
    if parts[-1] == "embedding":
      out[".".join(parts[:-1] + ["weight"])] = x
    elif parts[-1] == "kernel":
      out[".".join(parts[:-1] + ["weight"])] = np.ascontiguousarray(x.T)
    else:
      out[".".join(parts)] = x
  return out


def read_weights(path: Path) -> tuple[dict, str]:
  """({flat Flax path: array} of the full causal LM, the file read)."""
  file = path if path.is_file() else formats.find(path)
  weights, kind = formats.read(file)
  if kind == "gguf":
    weights, kind = llama_gguf.to_torch_names(weights, file), "pytorch"
  if kind == "pytorch":
    return from_torch_names(weights), f"{file.name} ({'dequantised' if file.suffix == '.gguf' else 'pytorch names'})"
  # Flax names: a causal LM's tree, or a base model's (without the `model/` prefix)
  if not any(k.startswith("model/") for k in weights):
    weights = {f"model/{k}": v for k, v in weights.items()}
  return weights, f"{file.name} (flax names)"


def load(path: Path, mcfg, compute_dtype: str = "float32", seed: int = 0, platform: str = "cpu", pooler: bool = False,
         config=None) -> tuple[Backbone, str]:
  """(the Backbone, a one-line report) of the Llama checkpoint at `path` (its `config`, where already read)."""
  from flax import traverse_util
  path = Path(path)
  config = copy.deepcopy(config) if config is not None else read_config(path)
  if mcfg.layers:  # a shapes-only variant of another depth (jaxft plan)
    config.num_hidden_layers = mcfg.layers
  if not supports(config):
    raise JaxftError(f"{path}: jaxft's llama module does not compute this config (activation "
                     f"{activation(config)!r}, rope {rope(config)}; it computes activations "
                     f"{', '.join(ACTIVATIONS)} and rope types {', '.join(ROPE_TYPES)})")
  if mcfg.scan_layers and len(set(layer_types(config))) > 1:
    raise JaxftError(f"model.scan_layers: {path}'s layers attend in different ways ({layer_types(config)}); one "
                     f"scanned body computes one kind: set model.scan_layers=false")
  module = CausalLM(config, jnp.dtype(compute_dtype), mcfg.remat == "block", mcfg.scan_layers)
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(seed), ids, ids, visibility({"input_ids": ids})))
  expected = traverse_util.flatten_dict(shapes["params"], sep="/")
  if mcfg.weights == "shapes":
    params, report = shapes["params"], f"{path.name}: model.weights=shapes: the architecture only, no weights read"
  elif mcfg.weights == "random":
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), ids, ids, visibility({"input_ids": ids}))["params"]
    report = f"{path.name}: model.weights=random: every param newly initialised"
  else:
    loaded, source = read_weights(path)
    if config.tie_word_embeddings:
      loaded.pop("lm_head/kernel", None)
    for k, x in loaded.items():
      if k in expected and tuple(x.shape) != tuple(expected[k].shape):
        raise JaxftError(f"{path}: '{k}' has shape {tuple(x.shape)}, the model expects {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(loaded))
    if missing:
      raise JaxftError(f"{path}: {len(missing)} {config.model_type} tensors missing, e.g. {missing[:3]}")
    unused = sorted(set(loaded) - set(expected))
    params = traverse_util.unflatten_dict({k: jnp.asarray(loaded[k], jnp.float32) for k in expected}, sep="/")
    report = f"{source}; unused checkpoint keys: {', '.join(unused[:5]) or 'none'}; newly initialised: none"
  tokenizer = _tokenizer(tokenizer_path(mcfg, path))

  def save(params, out_dir, state=None):
    from safetensors.numpy import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    save_file(to_torch_names({k: np.asarray(v, np.float32) for k, v in flat.items()}), out / "model.safetensors",
              metadata={"format": "pt"})
    tokenizer.save_pretrained(out)

  # the splash kernel (TPU): causal attention over segments; sliding windows and capped scores attend with XLA's
  kernel = (platform == "tpu" and mcfg.attention == "auto" and not any(windows(config))
            and variant(config).attn_softcap is None and variant(config).scale is None)
  backbone = Backbone(
      name=str(path), key=config.model_type, params=params, apply=make_apply(module, kernel), processor=tokenizer,
      config=config, conventions=CONVENTIONS, save=save, hidden_size=config.hidden_size,
      num_layers=config.num_hidden_layers, init_scale=config.initializer_range, head_dropout=0.0, packs=True,
      inputs=("input_ids", "attention_mask", "position_ids", "segment_ids", "branch_ids"),
      new_cache=lambda batch, length: new_cache(config, batch, length, jnp.dtype(compute_dtype)),
      train_flops=functools.partial(token_flops, config, tied_output=config.tie_word_embeddings),
      kept_blocks=(lambda: {name.replace(".", "/"): leaves for name, leaves in llama_gguf.kept_blocks(path).items()})
      if path.suffix == ".gguf" else None)
  return backbone, report
