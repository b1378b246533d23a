"""Fashion-MNIST (Xiao et al. 2017, MIT): 70,000 28x28 greyscale images of clothing in 10 classes, from the
Debian package `dataset-fashion-mnist` (the original IDX files), as a TFDS builder with uint8 Tensor
features (no TensorFlow). Splits `train` (60,000) and `test` (10,000), in file order."""
import gzip

import numpy as np
import tensorflow_datasets as tfds

from jaxft import assets

ASSET = "debian:dataset-fashion-mnist/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path) -> np.ndarray:
  """An IDX file (gzipped): the magic's last byte is the rank, then one big-endian uint32 per dim, then uint8s."""
  raw = gzip.decompress(path.read_bytes())
  rank = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(shape)


class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Fashion-MNIST from the Debian package's IDX files."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # no checksums file beside the code
  RELEASE_NOTES = {"1.0.0": "Initial release: IDX files of dataset-fashion-mnist 0.0~git20200523, file order."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True, license="MIT",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASSES)}))

  def _split_generators(self, dl_manager):
    root = assets.resolve(ASSET)
    return {split: self._generate_examples(root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz")
            for split, prefix in (("train", "train"), ("test", "t10k"))}

  def _generate_examples(self, images, labels):
    for i, (x, y) in enumerate(zip(read_idx(images), read_idx(labels))):
      yield i, {"image": x, "label": int(y)}


Builder = FashionMnist
