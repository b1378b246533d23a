"""Images for vision models: decode, grey -> RGB, the evaluation view and the seeded train-time view.

Every view is a uint8 [S, S, 3] array; normalisation is the model's (its provider applies it on the
device). The train view (random resized crop, a horizontal flip if asked) is a pure function of (seed, example,
epoch), so a resumed run sees exactly the images an uninterrupted one would have.
"""
import contextlib
import math

import numpy as np
from PIL import Image

from jaxft.errors import JaxftError

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I")  # 16-bit greyscale files (PNG), as PIL opens them


def decode(x, where: str) -> Image.Image:
  """An RGB PIL image from an image file or an array ([H, W] grey, [H, W, 1], [H, W, 3] or [H, W, 4]; uint8, or
  uint16 scaled to 8 bits, as 16-bit greyscale files are)."""
  if isinstance(x, str):
    with _opened(x, where) as im:
      return decode(np.clip(np.asarray(im), 0, 65535).astype(np.uint16), where) if im.mode in WIDE_MODES else \
          im.convert("RGB")
  x = np.asarray(x)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.dtype.kind == "u" and x.dtype.itemsize == 2 and x.ndim == 2:  # 16-bit levels (either byte order) -> 8 bits
    x = ((x.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (3, 4)):
    raise JaxftError(f"{where}: an image must be uint8 [H, W] or [H, W, 1 | 3 | 4] (or uint16 [H, W]), got {x.dtype} "
                     f"{list(x.shape)}")
  return Image.fromarray(x).convert("RGB")


def check(path: str, where: str) -> None:
  """An image file PIL cannot open (not an image, damaged, or over its decompression-bomb limit) fails when
  the data loads, not at its first batch; only the header is read."""
  with _opened(path, where):
    pass


@contextlib.contextmanager
def _opened(path: str, where: str):
  try:
    with Image.open(path) as im:
      yield im
  except (OSError, Image.DecompressionBombError) as e:
    raise JaxftError(f"{where}: cannot read the image {path}: {e}") from None


def eval_view(im: Image.Image, size: int) -> np.ndarray:
  """The centred square of the short side, resized (bicubic) to size x size."""
  w, h = im.size
  s = min(w, h)
  box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
  return np.asarray(im.resize((size, size), Image.BICUBIC, box=box))


def train_view(im: Image.Image, size: int, rng: np.random.Generator, scale=(0.35, 1.0),
               ratio=(3 / 4, 4 / 3), flip: bool = False) -> np.ndarray:
  """Inception-style random resized crop (area fraction in `scale`, aspect ratio in `ratio`, log-uniform;
  the whole image after 10 misses), resized to size x size; with `flip`, flipped left-right with probability 1/2."""
  w, h = im.size
  box = (0, 0, w, h)
  for _ in range(10):
    area = w * h * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if cw <= w and ch <= h:
      x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      box = (x0, y0, x0 + cw, y0 + ch)
      break
  out = im.resize((size, size), Image.BICUBIC, box=box)
  if flip and rng.uniform() < 0.5:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def example_rng(seed: int, example: int, epoch: int) -> np.random.Generator:
  """The generator of one example's augmentation in one epoch."""
  return np.random.default_rng([seed, example, epoch])
