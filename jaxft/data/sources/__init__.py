"""Raw examples per split, from a built-in dataset, local files, or a locally prepared TFDS dataset.

  data.name: vader_movie_reviews | wnut16   built-ins: TFDS builders prepared in data.tfds_dir on first use
             | fashion_mnist | mnist_5k     (builtin.py)
             files                          data.train / validation / test (files.py)
             image_folder                   data.train / ...: class subfolders of images (image_folder.py)
             tfds:NAME[:VERSION]            a TFDS dataset prepared in data.tfds_dir (array_record; tfds.py)

A source module (a file here and a line in SOURCES) exports
  splits(dcfg, log) -> ({split: [record, ...]}, {record key: [class names]})
  TAKES   the data.* keys only some sources take: {key: None, or (check(value), the error if it fails)}
A source returns records (plain dicts); the task turns them into arrays. A split the source lacks
is split off train by data.split, with data.split_seed.
"""
import dataclasses
import importlib
from pathlib import Path

import numpy as np

from jaxft.errors import JaxftError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Source:
  splits: dict  # "train" | "validation" | "test" -> list of records
  label_names: dict  # record key -> class names, where the source knows them (TFDS ClassLabel)


def tfds_dir(dcfg) -> Path:
  from jaxft.assets import cache_dir
  return Path(dcfg.tfds_dir).expanduser() if dcfg.tfds_dir else cache_dir() / "tfds"


# data.name (or its prefix, up to ':') -> the module that reads it; any other name is a built-in's
SOURCES = {"files": "files", "image_folder": "image_folder", "tfds": "tfds"}
BUILTIN = "builtin"


def module(name: str):
  """The source module that reads data.name=`name`."""
  return importlib.import_module(f"jaxft.data.sources.{SOURCES.get(name.split(':')[0], BUILTIN)}")


def check_keys(dcfg) -> None:
  """Each source's own keys: set only for a source that takes them, and checked as it says."""
  source, default = module(dcfg.name), type(dcfg)()
  owners: dict[str, list[str]] = {}
  for mod in sorted({*SOURCES.values(), BUILTIN}):
    for key in importlib.import_module(f"jaxft.data.sources.{mod}").TAKES:
      owners.setdefault(key, []).append(mod)
  for key, mods in owners.items():
    value = getattr(dcfg, key)
    if value != getattr(default, key) and key not in source.TAKES:
      raise JaxftError(f"config key 'data.{key}' is not read by data.name={dcfg.name}; it is a key of the "
                       f"{' and '.join(mods)} source{'s' if len(mods) > 1 else ''}")
    if key in source.TAKES and source.TAKES[key] is not None and not source.TAKES[key][0](value):
      raise JaxftError(f"config key 'data.{key}' {source.TAKES[key][1]}, got {value!r}")


def load(dcfg, log=print) -> Source:
  splits, names = module(dcfg.name).splits(dcfg, log)
  if not splits.get("train"):
    raise JaxftError(f"data.name={dcfg.name}: no training examples (splits: {', '.join(splits) or 'none'})")
  return Source(limit(complete(splits, dcfg), dcfg.limit or {}, dcfg.split_seed, log), names)


def limit(splits: dict, caps: dict, seed: int, log=print) -> dict:
  """Each split of `caps` cut to a seeded random `caps[split]` of its examples (kept in their order)."""
  out = dict(splits)
  for split, n in caps.items():
    if n < len(splits[split]):
      keep = np.sort(np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(splits[split]))[:n])
      out[split] = [splits[split][i] for i in keep]
      log(f"data.limit: {n:,} of the {len(splits[split]):,} {split} examples")
  return out


def complete(splits: dict, dcfg) -> dict:
  """train, validation and test: the missing ones split off train (fractions from data.split: with both
  missing, train / validation / test = 80 / 10 / 10 by default; with one missing, train and it in the
  ratio of their fractions)."""
  missing = [s for s in SPLITS[1:] if s not in splits]
  if not missing:
    return {s: splits[s] for s in SPLITS}
  train, frac = splits["train"], dict(zip(SPLITS, dcfg.split))
  parts = ["train"] + missing
  total = sum(frac[s] for s in parts)
  perm = np.random.default_rng(dcfg.split_seed).permutation(len(train))
  out, start = dict(splits), 0
  for i, s in enumerate(parts):  # the last part takes the rounding remainder
    end = len(train) if i == len(parts) - 1 else start + int(round(frac[s] / total * len(train)))
    out[s] = [train[j] for j in perm[start:end]]
    start = end
  return {s: out[s] for s in SPLITS}
