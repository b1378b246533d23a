"""10,605 movie-review snippets rated -4..4 by humans (Hutto & Gilbert 2014, MIT), from the vaderSentiment
sdist, as a TFDS builder. One split, `train`, in file order: `score` is the mean human rating (-3.9..3.9),
label = score > 0, the 37 snippets scored exactly 0 dropped (10,568 kept); `id` is the running index of a
kept snippet."""
import tarfile

import numpy as np
import tensorflow_datasets as tfds

from jaxft import assets

ASSET = "pypi:vaderSentiment==3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz#sdist"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


class VaderMovieReviews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Sentiment of movie-review snippets (vaderSentiment 3.3.2): the mean human score, and its sign."""

  VERSION = tfds.core.Version("1.1.0")
  code_path = None  # no checksums file beside the code (tfds 4.9.10's lookup needs importlib_resources)
  RELEASE_NOTES = {"1.0.0": "Initial release: 10,568 snippets in file order, score 0 dropped.",
                   "1.1.0": "Adds `score`, the mean human rating (regression); text, label and id unchanged."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True, license="MIT",
        homepage="https://github.com/cjhutto/vaderSentiment",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "id": np.int32, "score": np.float32,
            "label": tfds.features.ClassLabel(names=["negative", "positive"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(assets.resolve(ASSET))}

  def _generate_examples(self, archive):
    with tarfile.open(archive) as t:
      text = t.extractfile(MEMBER).read().decode("utf-8")
    i = 0
    for line in text.splitlines():
      if not line.strip():
        continue
      _, score, snippet = line.split("\t", 2)
      if float(score) != 0:
        yield i, {"text": snippet.strip(), "label": int(float(score) > 0), "id": i, "score": float(score)}
        i += 1


Builder = VaderMovieReviews
