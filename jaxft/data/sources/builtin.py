"""Built-in datasets: jaxft's own TFDS builders, prepared into a TFDS data dir on first use.

`load(name, data_dir)` -> ({split: [record, ...]}, {feature_key: [label names]}), as `tfds.load`.
A built-in is a builder module in builders/ and its name in builders.NAMES.
"""
import contextlib
import importlib
import io
import shutil
import tempfile
import time
from pathlib import Path

from jaxft.data.sources import tfds as tfds_source
from jaxft.data.sources.builders import NAMES
from jaxft.errors import JaxftError


def builder(name: str):
  """The TFDS builder class of built-in `name` (imports tensorflow_datasets, so only when needed)."""
  return importlib.import_module(f"jaxft.data.sources.builders.{name}").Builder


TAKES = {"tfds_dir": None}


def splits(dcfg, log=print) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
  """The built-in data.name, prepared in data.tfds_dir on first use."""
  from jaxft.data.sources import tfds_dir
  return load(dcfg.name, tfds_dir(dcfg), log)


def load(name: str, data_dir: Path, log=print) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
  """The built-in `name` from data_dir, prepared there first (once) if it is not yet."""
  if name not in NAMES:
    raise JaxftError(f"unknown built-in dataset '{name}'; known: {', '.join(NAMES)}")
  cls = builder(name)
  ref = f"{name}:{cls.VERSION}"
  if tfds_source.prepared_dir(ref, Path(data_dir)) is None:
    prepare(cls, Path(data_dir), log)
  return tfds_source.load(ref, Path(data_dir))


def prepare(cls, data_dir: Path, log=print) -> Path:
  """Builds `cls` as array_record into a temporary dir beside its target, then renames it into place
  (atomic), so a crash half-way never leaves a dataset that looks prepared. Returns the version dir."""
  import tensorflow_datasets as tfds
  t0 = time.time()
  data_dir.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".prepare-{cls.name}-", dir=data_dir)).resolve()
  try:
    builder = cls(data_dir=str(tmp))
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):  # tfds prints its own banners to stdout
      builder.download_and_prepare(file_format="array_record",
                                   download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    src = Path(builder.data_dir).resolve()  # tmp/NAME[/CONFIG]/VERSION
    dst = data_dir / src.relative_to(tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and not (dst / "dataset_info.json").is_file():
      shutil.rmtree(dst)  # leftovers without dataset_info.json are not a prepared dataset
    try:
      src.rename(dst)
    except OSError:
      if not (dst / "dataset_info.json").is_file():  # else another process prepared it meanwhile
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  n = sum(s.num_examples for s in builder.info.splits.values())
  log(f"prepared built-in dataset {builder.name} {builder.version} ({n:,} examples) in {dst} in "
      f"{time.time() - t0:.1f}s")
  return dst
