"""Reads a locally prepared TFDS dataset (array_record, no TensorFlow) into plain Python records.

`load("NAME[/CONFIG][:VERSION]", data_dir)` -> ({split: [record, ...]}, {feature_key: [label names]}).
Records keep the stored order; Text -> str, scalars and ClassLabels -> int / float / bool, Sequences ->
lists, nested dicts -> dicts, Tensor features -> numpy arrays. Nothing is ever downloaded or built here:
a dataset that is not prepared in data_dir is an error (tensorflow_datasets is imported only on use).
"""
import re
from pathlib import Path

import numpy as np

from jaxft.data.sources.builders import NAMES
from jaxft.errors import JaxftError

_NAME = re.compile(r"(?P<name>[a-z0-9_]+)(?:/(?P<config>[\w.\-]+))?(?::(?P<version>\d+\.\d+\.\d+))?$")
_VERSION = re.compile(r"\d+\.\d+\.\d+$")
_CHUNK = 4096  # records read per random-access batch
TAKES = {"tfds_dir": None}


def splits(dcfg, log=print) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
  """data.name=tfds:NAME[:VERSION], prepared in data.tfds_dir."""
  from jaxft.data.sources import tfds_dir
  return load(dcfg.name[len("tfds:"):], tfds_dir(dcfg))


def load(name: str, data_dir: Path) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
  """Every split of the prepared dataset `name`, in stored order, and the names of its ClassLabels."""
  builder = _builder(name, Path(data_dir))
  try:
    sources = builder.as_data_source()
  except NotImplementedError:  # prepared as tfrecord: random access needs array_record
    raise JaxftError(f"TFDS dataset '{name}' in {builder.data_dir} is not stored as array_record; rebuild it "
                     f"with `tfds build {name} --data_dir {data_dir} --file_format array_record`") from None
  splits = {}
  for split, source in sources.items():
    n = len(source)
    splits[str(split)] = [_py(r) for i in range(0, n, _CHUNK)
                          for r in source.__getitems__(range(i, min(i + _CHUNK, n)))]
  return splits, label_names(builder.info.features)


def label_names(features) -> dict[str, list[str]]:
  """{key: names} for every ClassLabel, at top level, in a Sequence or a nested dict ('a/b' keys)."""
  import tensorflow_datasets as tfds
  out = {}

  def walk(key, f):
    if isinstance(f, tfds.features.Sequence):
      walk(key, f.feature)
    elif isinstance(f, tfds.features.FeaturesDict):
      for k, sub in f.items():
        walk(f"{key}/{k}" if key else k, sub)
    elif isinstance(f, tfds.features.ClassLabel):
      out[key] = list(f.names)

  walk("", features)
  return out


def prepared_dir(name: str, data_dir: Path) -> Path | None:
  """The version directory of `name` in data_dir (the newest if no version is named), or None."""
  m = _parse(name)
  root = Path(data_dir) / m["name"] / (m["config"] or "")
  if m["version"]:
    cands = [root / m["version"]]
  else:
    cands = sorted((p for p in root.glob("*") if _VERSION.match(p.name)),
                   key=lambda p: tuple(map(int, p.name.split("."))), reverse=True)
  return next((p for p in cands if (p / "dataset_info.json").is_file()), None)


def _builder(name: str, data_dir: Path):
  vdir = prepared_dir(name, data_dir)
  if vdir is None:
    m = _parse(name)
    full = m["name"] + (f"/{m['config']}" if m["config"] else "")
    how = (f"'{full}' is a jaxft built-in, prepared on first use by data.name={full}" if full in NAMES else
           f"prepare it with `tfds build {full} --data_dir {data_dir} --file_format array_record`")
    configs = [] if m["config"] else sorted({p.parent.parent.name
                                             for p in (data_dir / m["name"]).glob("*/*/dataset_info.json")})
    if configs:
      how += f" (or name one of its prepared configs: {', '.join(f'{full}/{c}' for c in configs)})"
    raise JaxftError(f"TFDS dataset '{name}' (version {m['version'] or 'any'}) is not prepared in "
                     f"{data_dir}: {how}")
  import tensorflow_datasets as tfds
  return tfds.builder_from_directory(str(vdir))  # from dataset_info.json + features.json: no code, no network


def _parse(name: str):
  m = _NAME.match(name)
  if not m:
    raise JaxftError(f"bad TFDS dataset name {name!r}; expected NAME, NAME:VERSION or NAME/CONFIG:VERSION "
                     f"(e.g. my_dataset:1.0.0)")
  return m


def _py(v):
  """A decoded TFDS value -> plain Python (ndarrays, i.e. Tensor features, stay as they are)."""
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, list):
    return [_py(x) for x in v]
  if isinstance(v, dict):
    return {k: _py(x) for k, x in v.items()}
  return v
