"""Text-classification examples: built-in datasets and local JSONL / CSV / TSV files.

`load_splits(cfg.data)` -> ({"train"|"validation"|"test": (texts, labels)}, label_names).
"""
import csv
import io
import json
import tarfile

import numpy as np

from jaxft import assets
from jaxft.errors import JaxftError

VADER = "pypi:vaderSentiment==3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz#sdist"


def vader_movie_reviews(dcfg):
  """10,605 movie-review snippets rated -4..4 by humans (Hutto & Gilbert 2014, MIT), shipped in
  the vaderSentiment sdist. Label: mean score > 0; the 37 snippets scored exactly 0 are dropped."""
  archive = assets.resolve(VADER)
  with tarfile.open(archive) as t:
    member = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    text = t.extractfile(member).read().decode("utf-8")
  texts, labels = [], []
  for line in text.splitlines():
    if not line.strip():
      continue
    _, score, snippet = line.split("\t", 2)
    if float(score) != 0:
      texts.append(snippet.strip())
      labels.append(int(float(score) > 0))
  return _split(texts, np.array(labels, np.int32), dcfg), ["negative", "positive"]


def _read_rows(path: str, dcfg) -> tuple[list[str], list[str]]:
  p = assets.resolve(path)
  if p.suffix in (".jsonl", ".json"):
    rows = []
    for i, line in enumerate(p.read_text().splitlines()):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise JaxftError(f"{p}:{i + 1}: not valid JSON ({e.msg})") from None
  elif p.suffix in (".csv", ".tsv"):
    rows = list(csv.DictReader(io.StringIO(p.read_text()), delimiter="\t" if p.suffix == ".tsv" else ","))
  else:
    raise JaxftError(f"unsupported data file {p}: expected .jsonl, .csv or .tsv")
  if not rows:
    raise JaxftError(f"data file {p} holds no rows")
  for col in (dcfg.text_column, dcfg.label_column):
    if col not in rows[0]:
      raise JaxftError(f"data file {p} has no column '{col}' (columns: {', '.join(map(str, rows[0]))})")
  return [str(r[dcfg.text_column]) for r in rows], [str(r[dcfg.label_column]) for r in rows]


def files(dcfg):
  """Local files: train, and validation / test (split off train when absent)."""
  if not dcfg.train:
    raise JaxftError("data.name is 'files' but data.train is not set")
  texts, raw = _read_rows(dcfg.train, dcfg)
  names = dcfg.label_names or sorted(set(raw))
  index = {n: i for i, n in enumerate(names)}

  def to_ids(raw_labels, path):
    bad = sorted(set(raw_labels) - set(index))
    if bad:
      raise JaxftError(f"{path}: label(s) {bad[:5]} not in data.label_names {names}")
    return np.array([index[r] for r in raw_labels], np.int32)

  labels = to_ids(raw, dcfg.train)
  if dcfg.validation or dcfg.test:
    splits = {"train": (texts, labels)}
    for split in ("validation", "test"):
      if not getattr(dcfg, split):
        raise JaxftError(f"data.{split} is not set (set both validation and test, or neither)")
      t, r = _read_rows(getattr(dcfg, split), dcfg)
      splits[split] = (t, to_ids(r, getattr(dcfg, split)))
    return splits, names
  return _split(texts, labels, dcfg), names


def _split(texts, labels, dcfg):
  perm = np.random.default_rng(dcfg.split_seed).permutation(len(texts))
  n_train = int(round(dcfg.split[0] * len(texts)))
  n_val = int(round(dcfg.split[1] * len(texts)))
  parts = {"train": perm[:n_train], "validation": perm[n_train:n_train + n_val],
           "test": perm[n_train + n_val:]}
  return {k: ([texts[i] for i in idx], labels[idx]) for k, idx in parts.items()}


DATASETS = {"vader_movie_reviews": vader_movie_reviews, "files": files}


def load_splits(dcfg):
  if dcfg.name not in DATASETS:
    raise JaxftError(f"unknown data.name '{dcfg.name}'; known: {', '.join(DATASETS)}")
  return DATASETS[dcfg.name](dcfg)
