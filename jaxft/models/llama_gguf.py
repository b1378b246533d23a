"""The llama family's GGUF files: llama.cpp's tensor names and metadata -> transformers' PyTorch names and config,
for the architectures in ARCHITECTURES (general.architecture): llama (Llama, SmolLM, TinyLlama, Mistral-like
files), qwen2, qwen3, gemma2 and gemma3. What llama.cpp's converter changed is undone: it permutes the rows of a llama
file's q_proj and k_proj (its RoPE pairs dimensions i and i + 1, transformers' i and i + Dh/2: `unpermute`), and
it stores Gemma's RMSNorm weights plus one (ggml's norm multiplies by the weight; Gemma's by 1 + weight).
"""
import dataclasses
from pathlib import Path

from jaxft.errors import JaxftError
from jaxft.formats import gguf

# llama.cpp tensor names -> transformers' PyTorch names (blk.N. -> model.layers.N.)
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
          "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
          "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
          "attn_k_norm.weight": "self_attn.k_norm.weight",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight"}
# Gemma 2 / 3's sandwich norms: ffn_norm is the MLP's input norm, the post_* norms follow attention and MLP
_SANDWICH = {**_BLOCK, "ffn_norm.weight": "pre_feedforward_layernorm.weight",
             "post_attention_norm.weight": "post_attention_layernorm.weight",
             "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
_SKIPPED = ("rope_freqs.weight",)  # llama3 RoPE factors: computed from the config's rope_scaling instead


@dataclasses.dataclass(frozen=True)
class Architecture:
  config: str  # transformers' config class
  block: dict  # its block tensors' names
  permuted: bool = False  # llama.cpp permuted q / k rows (unpermute)
  norm_shift: float = 0.0  # added to every norm weight by llama.cpp's converter
  extra: tuple = ()  # config keys read from the file's metadata: (config key, metadata key, default)


ARCHITECTURES = {
    "llama": Architecture("LlamaConfig", _BLOCK, permuted=True),
    "qwen2": Architecture("Qwen2Config", _BLOCK),
    "qwen3": Architecture("Qwen3Config", _BLOCK),
    # llama.cpp's Gemma 2: local (sliding) layers first and every other one after, soft-capped scores and logits
    "gemma2": Architecture("Gemma2Config", _SANDWICH, norm_shift=1.0,
                           extra=(("sliding_window", "attention.sliding_window", 4096),
                                  ("attn_logit_softcapping", "attn_logit_softcapping", 50.0),
                                  ("final_logit_softcapping", "final_logit_softcapping", 30.0))),
    # llama.cpp's Gemma 3: global layers every sixth, local ones with theta 10000 (fixed there, as in transformers)
    "gemma3": Architecture("Gemma3TextConfig", _SANDWICH, norm_shift=1.0,
                           extra=(("sliding_window", "attention.sliding_window", 512),)),
}


def architecture(meta: dict, path: Path) -> tuple[str, Architecture]:
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise JaxftError(f"{path}: GGUF architecture {arch!r}; jaxft reads {', '.join(ARCHITECTURES)} GGUF files")
  return arch, ARCHITECTURES[arch]


def config(path: Path):
  """transformers' config of the GGUF file's model, from its metadata."""
  import transformers
  reader = gguf.open_file(path)
  meta = gguf.metadata(reader)
  arch, spec = architecture(meta, path)
  get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
  try:
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", get("rope.dimension_count", int(get("embedding_length")) // heads)))
    cfg = dict(
        vocab_size=int(get("vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=int(get("embedding_length")), intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), head_dim=head_dim,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        **{key: type(default)(get(field, default)) for key, field, default in spec.extra})
  except (TypeError, KeyError) as e:
    raise JaxftError(f"{path}: GGUF metadata lacks {arch}.* model sizes ({e})") from None
  if arch == "gemma3":  # (llama.cpp's: queries scaled by head_dim ** -0.5, local layers' theta 10000)
    cfg.update(query_pre_attn_scalar=head_dim, rope_local_base_freq=10000.0)
  if arch == "gemma2":  # llama.cpp's query scale: head_dim ** -0.5, but (hidden / heads) ** -0.5 for the 46-layer 27B
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // heads if cfg["num_hidden_layers"] == 46 else head_dim
  scaling = get("rope.scaling.type")
  if scaling == "linear":
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
  elif scaling not in (None, "none"):
    raise JaxftError(f"{path}: GGUF rope scaling {scaling!r} is not supported (linear is)")
  names = {t.name for t in reader.tensors}
  cfg["tie_word_embeddings"] = "output.weight" not in names
  if arch == "llama":
    cfg["attention_bias"] = "blk.0.attn_q.bias" in names
  if "rope_freqs.weight" in names:
    raise JaxftError(f"{path}: llama3-style RoPE factors (rope_freqs.weight) are not read yet; use the "
                     f"Hugging Face checkpoint")
  return getattr(transformers, spec.config)(**cfg)


def unpermute(w, heads: int):
  """Undoes llama.cpp's q / k row permutation (its `permute(w, heads)`): rows [heads, 2, Dh/2] were
  reordered to [heads, Dh/2, 2]."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permuted_heads(meta: dict, arch: str, spec: Architecture, block_name: str) -> int | None:
  """How many heads llama.cpp permuted the rows of block tensor `block_name` ('attn_q.weight') by: the query
  heads for q, the key / value heads for k, of a permuted architecture; None: it is not permuted."""
  if not spec.permuted or not block_name.startswith(("attn_q.", "attn_k.")):
    return None
  heads = int(meta[f"{arch}.attention.head_count"])
  return heads if block_name.startswith("attn_q.") else int(meta.get(f"{arch}.attention.head_count_kv", heads))


def to_torch_names(weights: dict, path: Path) -> dict:
  """{transformers PyTorch name: array} from a GGUF file's {llama.cpp name: array}, as transformers holds them."""
  meta = gguf.metadata(gguf.open_file(path))
  arch, spec = architecture(meta, path)
  out = {}
  for name, x in weights.items():
    if name in _SKIPPED:
      continue
    if spec.norm_shift and name.endswith("norm.weight"):
      x = x - spec.norm_shift
    if name in _GLOBAL:
      out[_GLOBAL[name]] = x
      continue
    parts = name.split(".", 2)
    if parts[0] != "blk" or len(parts) < 3 or parts[2] not in spec.block:
      raise JaxftError(f"{path}: unknown GGUF tensor {name!r} for a {arch} model")
    if (heads := permuted_heads(meta, arch, spec, parts[2])) is not None:
      x = unpermute(x, heads)
    out[f"model.layers.{parts[1]}.{spec.block[parts[2]]}"] = x
  return out


def kept_blocks(path: Path) -> dict:
  """{transformers module name (`model.layers.0.self_attn.q_proj`): {"kernel_q", "kernel_scale"[, "kernel_min"]}}
  of the file's Q4_0 / Q4_1 / Q8_0 block matrices, in Flax orientation ([in, out]; codes [in / 2, out] for 4-bit
  ones), llama.cpp's q / k row permutation undone on the output axis (model.quantize: gguf)."""
  reader = gguf.open_file(path)
  meta = gguf.metadata(reader)
  arch, spec = architecture(meta, path)
  out = {}
  for t in reader.tensors:
    parts = t.name.split(".", 2)
    if parts[0] != "blk" or len(parts) < 3 or parts[2] not in spec.block or not parts[2].endswith(".weight"):
      continue
    b = gguf.blocks(t)
    if b is None:
      continue
    if (heads := permuted_heads(meta, arch, spec, parts[2])) is not None:
      b = {k: unpermute(v, heads) for k, v in b.items()}
    name = f"model.layers.{parts[1]}.{spec.block[parts[2]][: -len('.weight')]}"
    out[name] = {"kernel_q": b["q"].T.copy(), "kernel_scale": b["scale"].T.copy(),
                 **({"kernel_min": b["min"].T.copy()} if "min" in b else {})}
  return out
