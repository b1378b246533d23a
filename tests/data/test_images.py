"""Image decoding: 16-bit greyscale files scaled to 8 bits, and files PIL cannot open (damaged, or over its
decompression-bomb limit) refused in one line when the data loads, before training."""
import numpy as np
import pytest
from PIL import Image

from jaxft.data import images
from jaxft.data.sources import image_folder
from jaxft.errors import JaxftError


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
  levels = np.array([[0, 257, 32896], [49344, 65280, 65535]], np.uint16)  # 0, 1, 128, 192, 254, 255 in 8 bits
  Image.fromarray(levels).save(tmp_path / "wide.png")
  assert Image.open(tmp_path / "wide.png").mode in images.WIDE_MODES
  rgb = np.asarray(images.decode(str(tmp_path / "wide.png"), "x"))
  np.testing.assert_array_equal(rgb[..., 0], [[0, 1, 128], [192, 254, 255]])
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  np.testing.assert_array_equal(np.asarray(images.decode(levels, "x")), rgb)  # a uint16 array alike


def folder(tmp_path, name, write):
  (tmp_path / name / "a").mkdir(parents=True)
  write(tmp_path / name / "a" / "0.png")
  return tmp_path / name


def test_unreadable_images_fail_when_the_data_loads(tmp_path, monkeypatch):
  cfg = type("D", (), {})()
  damaged = folder(tmp_path, "damaged", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n not an image"))
  with pytest.raises(JaxftError, match=r"^data.train: cannot read the image .*damaged/a/0.png: cannot identify image file"):
    image_folder.read(damaged, "data.train", cfg)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100 x 100 image stands in for a 20000 x 20000 one
  bomb = folder(tmp_path, "bomb", lambda p: Image.new("L", (100, 100)).save(p))
  with pytest.raises(JaxftError, match=r"^data.train: cannot read the image .*bomb/a/0.png: Image size \(10000 pixels\) "
                                       r"exceeds limit of 2000 pixels, could be decompression bomb"):
    image_folder.read(bomb, "data.train", cfg)
  with pytest.raises(JaxftError, match=r"^train example 3: cannot read the image .*0.png: Image size"):
    images.decode(str(bomb / "a" / "0.png"), "train example 3")


def test_flips_only_when_asked():
  """task.flip: false (the default) never mirrors; true mirrors about half the views, each otherwise the same crop."""
  im = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1)))  # a left-to-right ramp
  plain = [images.train_view(im, 16, images.example_rng(0, i, 0)) for i in range(20)]
  flipped = [images.train_view(im, 16, images.example_rng(0, i, 0), flip=True) for i in range(20)]
  assert all(v[:, 0].mean() < v[:, -1].mean() for v in plain)  # the ramp still rises
  mirrored = [np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped, plain)]
  assert all(m or np.array_equal(f, p) for m, f, p in zip(mirrored, flipped, plain)) and 5 <= sum(mirrored) <= 15
