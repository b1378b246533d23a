"""Local data files -> records. data.train (required), data.validation, data.test, by suffix:

  .jsonl              one JSON object per line
  .json               SQuAD format ({"data": [{"paragraphs": [{"context", "qas"}]}]}) or a list of objects
  .csv / .tsv         a header row, then one record per row
  .conll / .txt       CoNLL: one token per line with its tag in data.conll_columns [token, tag] (whitespace-
                      or tab-separated), a blank (or whitespace-only) line between sentences ->
                      {data.tokens_column: [...], data.tags_column: [...]}
"""
import csv
import io
import json

from jaxft import assets
from jaxft.errors import JaxftError


def _jsonl(p):
  rows = []
  for i, line in enumerate(p.read_text().splitlines()):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise JaxftError(f"{p}:{i + 1}: not valid JSON ({e.msg})") from None
  return rows


def _json(p):
  try:
    doc = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise JaxftError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if isinstance(doc, list):
    return doc
  if not (isinstance(doc, dict) and isinstance(doc.get("data"), list)):
    raise JaxftError(f"{p}: expected a list of records or SQuAD format ({{\"data\": [...]}})")
  rows = []  # SQuAD: one record per question
  for article in doc["data"]:
    for para in article.get("paragraphs", []):
      for qa in para.get("qas", []):
        answers = [] if qa.get("is_impossible") else qa.get("answers", [])
        rows.append({"id": str(qa.get("id", len(rows))), "context": para["context"], "question": qa["question"],
                     "answers": {"text": [a["text"] for a in answers],
                                 "answer_start": [int(a["answer_start"]) for a in answers]}})
  return rows


def _conll(p, dcfg):
  tok_col, tag_col = dcfg.conll_columns
  rows, tokens, tags = [], [], []
  for i, line in enumerate(p.read_text().splitlines()):
    if not line.strip() or line.startswith("-DOCSTART-"):
      if tokens:
        rows.append({dcfg.tokens_column: tokens, dcfg.tags_column: tags})
        tokens, tags = [], []
      continue
    cols = line.rstrip("\n").split("\t") if "\t" in line else line.split()
    try:
      tokens.append(cols[tok_col].strip())
      tags.append(cols[tag_col].strip())
    except IndexError:
      raise JaxftError(f"{p}:{i + 1}: no column {max(tok_col, tag_col)} (data.conll_columns "
                       f"{dcfg.conll_columns}) in {line!r}") from None
  if tokens:
    rows.append({dcfg.tokens_column: tokens, dcfg.tags_column: tags})
  return rows


def read(path: str, dcfg) -> list[dict]:
  p = assets.resolve(path)
  if p.suffix == ".jsonl":
    rows = _jsonl(p)
  elif p.suffix == ".json":
    rows = _json(p)
  elif p.suffix in (".csv", ".tsv"):
    rows = list(csv.DictReader(io.StringIO(p.read_text()), delimiter="\t" if p.suffix == ".tsv" else ","))
  elif p.suffix in (".conll", ".txt"):
    rows = _conll(p, dcfg)
  else:
    raise JaxftError(f"unsupported data file {p}: expected .jsonl, .json, .csv, .tsv, .conll or .txt")
  if not rows:
    raise JaxftError(f"data file {p} holds no records")
  return rows


def load(dcfg) -> dict:
  """{split: records} of the splits that are set."""
  if not dcfg.train:
    raise JaxftError("data.name is 'files' but data.train is not set")
  return {s: read(getattr(dcfg, s), dcfg) for s in ("train", "validation", "test") if getattr(dcfg, s)}
