"""Local data files -> records. data.train (required), data.validation, data.test, by suffix:

  .jsonl              one JSON object per line
  .json               SQuAD format ({"data": [{"paragraphs": [{"context", "qas"}]}]}) or a list of objects
  .csv / .tsv         a header row, then one record per row, with as many fields as the header
  .conll / .txt       CoNLL: one token per line with its tag in data.conll_columns [token, tag] (whitespace-
                      or tab-separated), a blank (or whitespace-only) line between sentences ->
                      {"tokens": [...], "tags": [...]} (task.tokens_column and tags_column by default)

Files are UTF-8 (a byte order mark is skipped). Records of line-based files are `Record`s, which know their
file and line, so a task's error about a record names FILE:LINE.
"""
import csv
import io
import json

from jaxft import assets
from jaxft.errors import JaxftError


class Record(dict):
  """A record that knows where it was read: `origin` is 'FILE:LINE' (of its first line); a CoNLL sentence's
  token k is on line LINE + k (token_origin)."""
  __slots__ = ("file", "line", "per_token")

  def __init__(self, fields, file, line: int, per_token: bool = False):
    super().__init__(fields)
    self.file, self.line, self.per_token = file, line, per_token

  @property
  def origin(self) -> str:
    return f"{self.file}:{self.line}"

  def token_origin(self, k: int) -> str | None:
    return f"{self.file}:{self.line + k}" if self.per_token else None


def _text(p) -> str:
  """The file's text; bytes that are not UTF-8 are a one-line error naming the line."""
  data = p.read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise JaxftError(f"{p}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _lines(p) -> list[str]:
  """The file's lines (split at line feeds only: U+2028 and the like are text, not line breaks)."""
  return [line.rstrip("\r") for line in _text(p).split("\n")]


def _jsonl(p):
  rows = []
  for i, line in enumerate(_lines(p)):
    if line.strip():
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise JaxftError(f"{p}:{i + 1}: not valid JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        raise JaxftError(f"{p}:{i + 1}: expected a JSON object, got {type(obj).__name__} {line.strip()[:40]}")
      rows.append(Record(obj, p, i + 1))
  return rows


def _json(p):
  try:
    doc = json.loads(_text(p))
  except json.JSONDecodeError as e:
    raise JaxftError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if isinstance(doc, list):
    bad = next((i for i, r in enumerate(doc) if not isinstance(r, dict)), None)
    if bad is not None:
      raise JaxftError(f"{p}: record {bad + 1} is not a JSON object: {json.dumps(doc[bad])[:40]}")
    return doc
  if not (isinstance(doc, dict) and isinstance(doc.get("data"), list)):
    raise JaxftError(f"{p}: expected a list of records or SQuAD format ({{\"data\": [...]}})")
  rows = []  # SQuAD: one record per question
  try:
    for article in doc["data"]:
      for para in article.get("paragraphs", []):
        for qa in para.get("qas", []):
          answers = [] if qa.get("is_impossible") else qa.get("answers", [])
          rows.append({"id": str(qa.get("id", len(rows))), "context": para["context"], "question": qa["question"],
                       "answers": {"text": [a["text"] for a in answers],
                                   "answer_start": [int(a["answer_start"]) for a in answers]}})
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise JaxftError(f"{p}: question {len(rows) + 1} is not in SQuAD format ({type(e).__name__}: {e})") from None
  return rows


def _csv(p, delimiter: str):
  reader = csv.reader(io.StringIO(_text(p)), delimiter=delimiter)
  header = next(reader, [])
  rows, line = [], reader.line_num + 1
  for fields in reader:
    if fields and len(fields) != len(header):
      raise JaxftError(f"{p}:{line}: {len(fields)} field(s) where the header has {len(header)} "
                       f"({delimiter.join(header)})")
    if fields:
      rows.append(Record(zip(header, fields), p, line))
    line = reader.line_num + 1
  return rows


def _conll(p, dcfg):
  tok_col, tag_col = dcfg.conll_columns
  rows, tokens, tags, first = [], [], [], 1
  for i, line in enumerate(_lines(p)):
    if not line.strip() or line.startswith("-DOCSTART-"):
      if tokens:
        rows.append(Record({"tokens": tokens, "tags": tags}, p, first, per_token=True))
        tokens, tags = [], []
      continue
    cols = line.split("\t") if "\t" in line else line.split()
    if not tokens:
      first = i + 1
    try:
      tokens.append(cols[tok_col].strip())
      tags.append(cols[tag_col].strip())
    except IndexError:
      raise JaxftError(f"{p}:{i + 1}: no column {max(tok_col, tag_col)} (data.conll_columns "
                       f"{dcfg.conll_columns}) in {line!r}") from None
  if tokens:
    rows.append(Record({"tokens": tokens, "tags": tags}, p, first, per_token=True))
  return rows


def read(path: str, dcfg) -> list[dict]:
  p = assets.resolve(path)
  if p.suffix == ".jsonl":
    rows = _jsonl(p)
  elif p.suffix == ".json":
    rows = _json(p)
  elif p.suffix in (".csv", ".tsv"):
    rows = _csv(p, "\t" if p.suffix == ".tsv" else ",")
  elif p.suffix in (".conll", ".txt"):
    rows = _conll(p, dcfg)
  else:
    raise JaxftError(f"unsupported data file {p}: expected .jsonl, .json, .csv, .tsv, .conll or .txt")
  if not rows:
    raise JaxftError(f"data file {p} holds no records")
  return rows


TAKES = {"train": None, "validation": None, "test": None,
         "conll_columns": (lambda v: len(v) == 2, "must be [token column, tag column]")}


def splits(dcfg, log=print) -> tuple[dict, dict]:
  """{split: records} of the splits that are set (files name no classes)."""
  if not dcfg.train:
    raise JaxftError("data.name is 'files' but data.train is not set")
  return {s: read(getattr(dcfg, s), dcfg) for s in ("train", "validation", "test") if getattr(dcfg, s)}, {}
