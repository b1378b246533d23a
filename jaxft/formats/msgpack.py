"""Flax msgpack files (`flax_model.msgpack`) -> {'/'-joined param path: array}."""
from pathlib import Path

import numpy as np
from flax.serialization import msgpack_restore
from flax.traverse_util import flatten_dict


def read(path: Path) -> dict[str, np.ndarray]:
  tree = msgpack_restore(Path(path).read_bytes())
  if not isinstance(tree, dict):
    raise ValueError(f"holds a {type(tree).__name__}, not a tree of params")
  return {"/".join(map(str, keys)): np.asarray(x) for keys, x in flatten_dict(tree).items()}
