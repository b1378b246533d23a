"""`data.name: image_folder`: a user's own images, one subfolder per class (torchvision's ImageFolder layout).

  data.train: DIR/<class>/*.png|jpg|jpeg|bmp|gif|webp   (required)
  data.validation, data.test: the same layout (absent: split off train by data.split)

Records are {"image": the file's path, "label": its class folder} (the image task's default columns); files are decoded
(PIL) when batches are made; their headers are read when the data loads, so a file PIL cannot open fails before
training starts. The classes are the training data's folders, sorted (as any string labels).
"""
from pathlib import Path

from jaxft import assets
from jaxft.data import images
from jaxft.errors import JaxftError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TAKES = {"train": None, "validation": None, "test": None}


def splits(dcfg, log=print) -> tuple[dict, dict]:
  if not dcfg.train:
    raise JaxftError("data.name=image_folder needs data.train: a directory with one subfolder of images per class")
  splits = {split: read(assets.resolve(getattr(dcfg, split)), f"data.{split}", dcfg)
            for split in ("train", "validation", "test") if getattr(dcfg, split)}
  return splits, {}


def read(root: Path, key: str, dcfg) -> list[dict]:
  """The records of one split."""
  if not root.is_dir():
    raise JaxftError(f"{key}={root} is not a directory (image_folder: one subfolder of images per class)")
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  records = [{"image": str(f), "label": c} for c in classes
             for f in sorted((root / c).rglob("*")) if f.suffix.lower() in SUFFIXES]
  if not records:
    raise JaxftError(f"{key}={root}: no images ({', '.join(SUFFIXES)}) in class subfolders "
                     f"({', '.join(classes[:5]) or 'no subfolders'})")
  for r in records:
    images.check(r["image"], key)
  return records
