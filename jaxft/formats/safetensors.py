"""safetensors files -> {name: array}. The header's `format` metadata gives the kind: "flax" files (transformers'
Flax save_pretrained) hold '.'-joined Flax paths, returned '/'-joined; any other file is "pytorch"."""
import json
from pathlib import Path

import ml_dtypes  # registers 'bfloat16' with numpy, so safetensors' numpy loader reads BF16
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

# Every dtype by its safetensors name, for files safetensors.numpy cannot read (float8).
DTYPES = {
  "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
  "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
  "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64,
  "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}


def read(path: Path) -> tuple[dict[str, np.ndarray], str]:
  with safe_open(str(path), framework="np") as f:
    metadata = f.metadata() or {}
  try:
    weights = load_file(str(path))
  except (TypeError, AttributeError):  # a dtype numpy has no name for (float8): decode the bytes here
    weights = read_raw(path)
  if metadata.get("format") == "flax":
    return {k.replace(".", "/"): v for k, v in weights.items()}, "flax"
  return weights, "pytorch"


def read_raw(path: Path) -> dict[str, np.ndarray]:
  """Decodes the file without safetensors: 8-byte little-endian header size, JSON header, then the data."""
  data = Path(path).read_bytes()
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in DTYPES:
      raise ValueError(f"tensor {name}: unsupported dtype {info['dtype']}")
    dtype = np.dtype(DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    if not 0 <= begin <= end <= len(data) - 8 - size or end - begin != dtype.itemsize * int(np.prod(info["shape"])):
      raise ValueError(f"tensor {name}: data_offsets {info['data_offsets']} do not fit its shape or the file")
    flat = np.frombuffer(data, dtype, count=(end - begin) // dtype.itemsize, offset=8 + size + begin)
    out[name] = flat.reshape(info["shape"]).copy()
  return out
