"""GGUF files (llama.cpp) -> PyTorch-named weights, a transformers config and the tokenizer, with the `gguf` package.

Tensors are dequantised to float32 by gguf.quants (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
K-quants Q2_K..Q6_K). llama.cpp's converter permutes the rows of q_proj and k_proj (its RoPE pairs
dimensions i and i + 1, transformers' i and i + Dh/2); `unpermute` undoes it. The tokenizer is built from
the metadata (tokens, merges, token types) by transformers' GGUF converters; the chat template too.
Only the llama architecture is read (Llama, SmolLM, TinyLlama, Mistral-like llama files).
"""
from pathlib import Path

import numpy as np

from jaxft.errors import JaxftError

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


def _reader(path: Path):
  import gguf
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # not a GGUF file, truncated, an unknown version
    raise JaxftError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def metadata(reader) -> dict:
  """{key: value} of the file's scalar and array fields (strings decoded)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    try:
      out[key] = field.contents()
    except AttributeError:  # gguf < 0.16: without this, every field read as missing ("architecture None")
      from importlib.metadata import version
      raise JaxftError(f"gguf {version('gguf')} cannot decode GGUF fields (ReaderField.contents() needs gguf >= 0.16): "
                       f"pip install -U 'gguf>=0.16'") from None
    except (ValueError, TypeError, IndexError, NotImplementedError, UnicodeDecodeError):
      continue  # a field type the package cannot decode: not one jaxft reads
  return out


def _architecture(meta: dict, path: Path) -> str:
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise JaxftError(f"{path}: GGUF architecture {arch!r}; jaxft reads llama GGUF files only")
  return arch


def llama_config(path: Path) -> dict:
  """transformers LlamaConfig keyword arguments from the GGUF metadata."""
  meta = metadata(_reader(path))
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
  reader = _reader(path)
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


def tensors(reader, path: Path) -> dict:
  """{llama.cpp name: float32 array in PyTorch layout ([out, in])}, dequantised."""
  import gguf
  out = {}
  for t in reader.tensors:
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise JaxftError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot dequantise") from None
    out[t.name] = np.asarray(x, np.float32).reshape(shape)
  return out


def read(path: Path) -> dict:
  """{transformers PyTorch name: float32 array} of a llama GGUF file, q / k rows in transformers' order."""
  reader = _reader(path)
  meta = metadata(reader)
  arch = _architecture(meta, path)
  heads = int(meta[f"{arch}.attention.head_count"])
  kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
  out = {}
  for name, x in tensors(reader, path).items():
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


def tokenizer(path: Path):
  """The tokenizer in the GGUF metadata, as a transformers PreTrainedTokenizerFast (with its chat template)."""
  import transformers
  from transformers.integrations.ggml import convert_gguf_tokenizer
  meta = metadata(_reader(path))
  arch = _architecture(meta, path)
  tok = {"tokenizer_type": "tokenizer.ggml.model", "tokens": "tokenizer.ggml.tokens",
         "scores": "tokenizer.ggml.scores", "token_type": "tokenizer.ggml.token_type",
         "merges": "tokenizer.ggml.merges", "bos_token_id": "tokenizer.ggml.bos_token_id",
         "eos_token_id": "tokenizer.ggml.eos_token_id", "unk_token_id": "tokenizer.ggml.unknown_token_id",
         "pad_token_id": "tokenizer.ggml.padding_token_id", "add_prefix_space": "tokenizer.ggml.add_space_prefix"}
  fields = {k: meta[v] for k, v in tok.items() if v in meta}
  if "tokens" not in fields:
    raise JaxftError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens); put a tokenizer.json "
                     f"beside it")
  backend, _ = convert_gguf_tokenizer(arch, fields)
  tokens = fields["tokens"]
  special = {name: tokens[fields[f"{name}_id"]] for name in ("bos_token", "eos_token", "unk_token", "pad_token")
             if fields.get(f"{name}_id") is not None and fields[f"{name}_id"] < len(tokens)}
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                              chat_template=meta.get("tokenizer.chat_template"), **special)
