"""GGUF files (llama.cpp) -> dequantised tensors under llama.cpp's names, the metadata, and the tokenizer, with
the `gguf` package. A reader never knows the model: the family whose architecture a file holds maps its names
and metadata (models/llama_gguf.py).

Tensors are dequantised to float32 by gguf.quants (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
K-quants Q2_K..Q6_K), in PyTorch layout ([out, in]). The tokenizer is built from the metadata (tokens, merges,
token types) by transformers' GGUF converters; the chat template too.
"""
from pathlib import Path

import numpy as np

from jaxft.errors import JaxftError


def open_file(path: Path):
  """A GGUF reader of `path`; a file cut short (its header, metadata or tensors) is a one-line error."""
  import gguf
  size = Path(path).stat().st_size
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # not a GGUF file, truncated, an unknown version
    why = str(e).splitlines()[0][:120] if str(e) else ""
    raise JaxftError(f"cannot read {path} ({size:,} bytes): truncated, damaged or not a GGUF file "
                     f"({type(e).__name__}: {why})") from None
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise JaxftError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,}, the file "
                       f"has {size:,}")
  return reader


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


# the block types kept as they are (model.quantize: gguf): bytes a block, values a block, a min in each block
BLOCKS = {"Q4_0": (18, 32, False), "Q4_1": (20, 32, True), "Q8_0": (34, 32, False)}


def blocks(t) -> dict:
  """A Q4_0 / Q4_1 / Q8_0 matrix's own blocks in PyTorch orientation ([out, ...]): {"q": uint8 [out, in / 2] (two
  4-bit codes a byte, as the file packs them) or int8 [out, in], "scale" float32 [out, in / 32], and Q4_1's "min"};
  quantize.py dequantizes them inside the matmul. None for another type."""
  if t.tensor_type.name not in BLOCKS:
    return None
  size, n, has_min = BLOCKS[t.tensor_type.name]
  rows = int(t.shape[1])
  raw = np.asarray(t.data, np.uint8).reshape(rows, -1, size)  # [out, in / 32, block bytes]
  out = {"scale": raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)}
  if has_min:
    out["min"] = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
  codes = raw[..., 4 if has_min else 2:]
  out["q"] = (codes.copy().view(np.int8) if t.tensor_type.name == "Q8_0" else codes).reshape(rows, -1)
  return out


def read(path: Path) -> dict:
  """{llama.cpp name: float32 array} of a GGUF file."""
  return tensors(open_file(path), path)


def tokenizer(path: Path):
  """The tokenizer in the GGUF metadata, as a transformers PreTrainedTokenizerFast (with its chat template)."""
  import transformers
  try:  # transformers' converter of llama.cpp's tokenizers (no torch needed), where each version keeps it
    from transformers.integrations.gguf import convert_gguf_tokenizer  # transformers 5
  except ImportError:
    from transformers.integrations.ggml import convert_gguf_tokenizer  # transformers 4
  meta = metadata(open_file(path))
  arch = meta.get("general.architecture")
  tok = {"tokenizer_type": "tokenizer.ggml.model", "tokens": "tokenizer.ggml.tokens",
         "scores": "tokenizer.ggml.scores", "token_type": "tokenizer.ggml.token_type",
         "merges": "tokenizer.ggml.merges", "bos_token_id": "tokenizer.ggml.bos_token_id",
         "eos_token_id": "tokenizer.ggml.eos_token_id", "unk_token_id": "tokenizer.ggml.unknown_token_id",
         "pad_token_id": "tokenizer.ggml.padding_token_id", "add_prefix_space": "tokenizer.ggml.add_space_prefix"}
  fields = {k: meta[v] for k, v in tok.items() if v in meta}
  if "tokens" not in fields:
    raise JaxftError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens); put a tokenizer.json "
                     f"beside it")
  if arch == "gemma3" and int(transformers.__version__.split(".")[0]) < 5:
    raise JaxftError(f"{path}: transformers {transformers.__version__} rebuilds this Gemma 3 tokenizer wrongly "
                     f"(it splits words into letters); transformers 5 reads it, or put a tokenizer.json beside it")
  try:
    backend, _ = convert_gguf_tokenizer(arch, fields)
  except KeyError:
    raise JaxftError(f"{path}: transformers {transformers.__version__} cannot rebuild a {arch} GGUF's tokenizer; a "
                     f"newer transformers can, or put a tokenizer.json beside the file") from None
  tokens = fields["tokens"]
  special = {name: tokens[fields[f"{name}_id"]] for name in ("bos_token", "eos_token", "unk_token", "pad_token")
             if fields.get(f"{name}_id") is not None and fields[f"{name}_id"] < len(tokens)}
  if meta.get("tokenizer.ggml.add_bos_token") and "bos_token" in special:  # (Gemma's: its text starts with <bos>)
    from tokenizers import processors
    bos = (special["bos_token"], fields["bos_token_id"])
    backend.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                              chat_template=meta.get("tokenizer.chat_template"), **special)
