"""The llama family's GGUF files: llama.cpp's tensor names and metadata -> transformers' PyTorch names and
LlamaConfig. llama.cpp's converter permutes the rows of q_proj and k_proj (its RoPE pairs dimensions i and
i + 1, transformers' i and i + Dh/2); `unpermute` undoes it. Llama, SmolLM, TinyLlama and Mistral-like llama
files (general.architecture = llama) are read.
"""
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
          "attn_v.bias": "self_attn.v_proj.bias",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight"}
_SKIPPED = ("rope_freqs.weight",)  # llama3 RoPE factors: computed from the config's rope_scaling instead


def _architecture(meta: dict, path: Path) -> str:
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise JaxftError(f"{path}: GGUF architecture {arch!r}; jaxft reads llama GGUF files only")
  return arch


def config(path: Path) -> dict:
  """transformers LlamaConfig keyword arguments from the GGUF metadata."""
  reader = gguf.open_file(path)
  meta = gguf.metadata(reader)
  arch = _architecture(meta, path)
  get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
  try:
    heads = int(get("attention.head_count"))
    cfg = dict(
        vocab_size=int(get("vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=int(get("embedding_length")), intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        head_dim=int(get("rope.dimension_count", int(get("embedding_length")) // heads)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
  except (TypeError, KeyError) as e:
    raise JaxftError(f"{path}: GGUF metadata lacks {arch}.* model sizes ({e})") from None
  scaling = get("rope.scaling.type")
  if scaling == "linear":
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
  elif scaling not in (None, "none"):
    raise JaxftError(f"{path}: GGUF rope scaling {scaling!r} is not supported (linear is)")
  names = {t.name for t in reader.tensors}
  cfg["tie_word_embeddings"] = "output.weight" not in names
  cfg["attention_bias"] = "blk.0.attn_q.bias" in names
  if "rope_freqs.weight" in names:
    raise JaxftError(f"{path}: llama3-style RoPE factors (rope_freqs.weight) are not read yet; use the "
                     f"Hugging Face checkpoint")
  return cfg


def unpermute(w, heads: int):
  """Undoes llama.cpp's q / k row permutation (its `permute(w, heads)`): rows [heads, 2, Dh/2] were
  reordered to [heads, Dh/2, 2]."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)




def to_torch_names(weights: dict, path: Path) -> dict:
  """{transformers PyTorch name: array} from a llama GGUF file's {llama.cpp name: array}, q / k rows in
  transformers' order."""
  meta = gguf.metadata(gguf.open_file(path))
  arch = _architecture(meta, path)
  heads = int(meta[f"{arch}.attention.head_count"])
  kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
  out = {}
  for name, x in weights.items():
    if name in _SKIPPED:
      continue
    if name in _GLOBAL:
      out[_GLOBAL[name]] = x
      continue
    parts = name.split(".", 2)
    if parts[0] != "blk" or len(parts) < 3 or parts[2] not in _BLOCK:
      raise JaxftError(f"{path}: unknown GGUF tensor {name!r} for a llama model")
    if parts[2].startswith("attn_q."):
      x = unpermute(x, heads)
    elif parts[2].startswith("attn_k."):
      x = unpermute(x, kv_heads)
    out[f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}"] = x
  return out
