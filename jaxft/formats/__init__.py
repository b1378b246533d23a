"""Checkpoint files -> flat {name: numpy array}. A reader never knows the model; a provider maps names.

`read` returns (weights, kind):
  "flax"     keys are '/'-joined Flax param paths: `encoder/layer/0/attention/self/query/kernel`
  "pytorch"  keys are PyTorch state-dict names, arrays in PyTorch layout: `encoder.layer.0.attention.self.query.weight`
"""
from pathlib import Path

import numpy as np

from jaxft import assets
from jaxft.errors import JaxftError

# The weights file of a Hugging Face checkpoint directory, in order of preference.
NAMES = ("flax_model.msgpack", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
         "pytorch_model.bin.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def find(directory: Path) -> Path:
  """The weights file of checkpoint `directory`: the first of NAMES that exists."""
  directory = Path(directory)
  for name in NAMES:
    if (directory / name).is_file():
      return directory / name
  raise JaxftError(f"no weights file in {directory}: expected one of {', '.join(NAMES)}")


def read(path: Path) -> tuple[dict[str, np.ndarray], str]:
  """(weights, kind) from a weights file (a directory: its `find` file), dispatched by file name."""
  path = Path(path)
  if path.is_dir():
    path = find(path)
  if not path.is_file():
    raise JaxftError(f"weights file not found: {path}")
  try:
    if path.name.endswith(".index.json"):
      return _read_sharded(path)
    if path.suffix == ".msgpack":
      from jaxft.formats import msgpack
      return msgpack.read(path), "flax"
    if path.suffix == ".safetensors":
      from jaxft.formats import safetensors
      return safetensors.read(path)
    if path.suffix in PICKLE_SUFFIXES:
      from jaxft.formats import torch_pickle
      return torch_pickle.read(path), "pytorch"
    if path.suffix == ".gguf":  # dequantised, in llama.cpp's names (the family maps them)
      from jaxft.formats import gguf
      return gguf.read(path), "gguf"
  except JaxftError:
    raise
  except Exception as e:  # a corrupt or truncated file: one line naming the file and the reason
    raise JaxftError(f"cannot read {path}: {_reason(e)}") from None
  raise JaxftError(f"unknown weights format: {path} (expected .msgpack, .safetensors, "
                   f"{'/'.join(PICKLE_SUFFIXES)}, .gguf or a sharded *.index.json)")


def _read_sharded(index: Path) -> tuple[dict[str, np.ndarray], str]:
  """Every shard that the index's `weight_map` lists, merged; all of them must be of one kind."""
  weight_map = assets.json_object(index).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise JaxftError(f"cannot read {index}: no 'weight_map' of tensor name -> shard file")
  weights, kinds = {}, set()
  for shard in dict.fromkeys(weight_map.values()):  # file order of first mention, each once
    if not (index.parent / shard).is_file():
      raise JaxftError(f"{index} lists shard {shard}, which is not in {index.parent}")
    part, kind = read(index.parent / shard)
    weights.update(part)
    kinds.add(kind)
  if len(kinds) > 1:
    raise JaxftError(f"{index}: shards of mixed kinds {sorted(kinds)}")
  missing = [n for n in weight_map if n not in weights and n.replace(".", "/") not in weights]
  if missing:
    raise JaxftError(f"{index}: {len(missing)} tensor(s) missing from their shards, e.g. {missing[:3]}")
  return weights, kinds.pop()


def _reason(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
