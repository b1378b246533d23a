"""Jane Austen's six novels (public domain; Project Gutenberg texts via the R package janeaustenr), from the
Debian package `r-cran-janeaustenr`, as a TFDS builder: one example per chapter {text, book, chapter}.

The package stores each novel as a character vector of lines in an R lazy-load database (Rdata.rdx: the
gzipped, R-serialised index of (offset, length) per object; Rdata.rdb: zlib-compressed R-serialised
objects); `read_rdata` decodes the few R types it holds. Chapters begin at lines "CHAPTER <numeral>" or
"Chapter <n>"; a chapter's text is its lines, paragraphs separated by blank lines as in the source.
Splits: the last chapter of each novel is `test`, the one before it `validation`, the rest `train`.
"""
import gzip
import re
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

from jaxft import assets

ASSET = "debian:r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data"
BOOKS = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
         "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
         "persuasion": "Persuasion"}
_CHAPTER = re.compile(r"^(CHAPTER|Chapter) ([IVXLC]+|\d+)\b")


class _Unserializer:
  """R's XDR serialisation format 2 / 3: NULL, symbols, pairlists, strings and string / int / real / list
  vectors, with attributes (returned as {"value", "attributes"} where present)."""

  def __init__(self, data: bytes):
    if data[:2] != b"X\n":
      raise ValueError("not R's XDR serialisation")
    self.data, self.pos, self.refs = data, 2, []
    version = self.int()
    self.pos += 8  # writer and minimal reader versions
    if version == 3:
      self.pos += 4 + self.int()  # the native encoding's name

  def int(self) -> int:
    (value,) = struct.unpack_from(">i", self.data, self.pos)
    self.pos += 4
    return value

  def item(self):
    flags = self.int()
    kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if kind in (254, 253, 252, 251, 242, 241):  # NULL and the special environments / values
      return None
    if kind == 255:  # a reference to an earlier symbol
      return self.refs[(flags >> 8 or self.int()) - 1]
    if kind == 1:  # symbol: its name
      self.refs.append(self.item())
      return self.refs[-1]
    if kind == 2:  # pairlist node: [(tag, value), ...]
      attributes = self.item() if has_attr else None
      tag = self.item() if has_tag else None
      head, rest = self.item(), self.item()
      del attributes
      return [(tag, head)] + (rest or [])
    if kind == 9:  # CHARSXP
      n = self.int()
      if n == -1:
        return None  # NA_character_
      self.pos += n
      return self.data[self.pos - n:self.pos].decode("utf-8")
    n = self.int()
    if kind in (10, 13):
      value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
      self.pos += 4 * n
    elif kind == 14:
      value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
      self.pos += 8 * n
    elif kind in (16, 19):
      value = [self.item() for _ in range(n)]
    else:
      raise ValueError(f"R type {kind} is not decoded")
    return {"value": value, "attributes": dict(self.item())} if has_attr else value


def read_rdata(directory) -> dict:
  """{name: value} of the objects in an R lazy-load database (Rdata.rdx + Rdata.rdb)."""
  index = _Unserializer(gzip.decompress((directory / "Rdata.rdx").read_bytes())).item()
  fields = dict(zip(index["attributes"]["names"], index["value"]))
  variables = fields["variables"]
  rdb = (directory / "Rdata.rdb").read_bytes()
  out = {}
  for name, (offset, length) in zip(variables["attributes"]["names"], variables["value"]):
    block = rdb[offset:offset + length]  # 4-byte big-endian length, then zlib data
    out[name] = _Unserializer(zlib.decompress(block[4:])).item()
  return out


def chapters(lines: list) -> list[str]:
  """The chapters of a novel's lines (front matter before the first chapter dropped)."""
  out, current = [], None
  for line in lines:
    line = line or ""
    if _CHAPTER.match(line):
      if current is not None:
        out.append(current)
      current = []
    elif current is not None:
      current.append(line)
  out.append(current)
  return ["\n".join(c).strip() for c in out if c]


class JaneAusten(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Jane Austen's novels by chapter, from janeaustenr's R data."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None
  RELEASE_NOTES = {"1.0.0": "Initial release: r-cran-janeaustenr's six novels, one example per chapter."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True, license="public domain (texts); MIT (janeaustenr)",
        homepage="https://github.com/juliasilge/janeaustenr",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "book": tfds.features.Text(),
                                             "chapter": np.int32}))

  def _split_generators(self, dl_manager):
    data = read_rdata(assets.resolve(ASSET))
    books = {BOOKS[name]: chapters(data[name]) for name in BOOKS}
    return {"train": self._generate_examples(books, slice(0, -2)),
            "validation": self._generate_examples(books, slice(-2, -1)),
            "test": self._generate_examples(books, slice(-1, None))}

  def _generate_examples(self, books, which: slice):
    for book, texts in books.items():
      numbers = list(range(1, len(texts) + 1))[which]
      for n, text in zip(numbers, texts[which]):
        yield f"{book}/{n}", {"text": text, "book": book, "chapter": n}


Builder = JaneAusten
