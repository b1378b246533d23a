"""TFDS as the dataset catalogue: local GeneratorBasedBuilders prepared as array_record and read back as
plain Python records (no TensorFlow), missing datasets as one-line errors, and the built-ins."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxft.data.sources import builtin
from jaxft.data.sources import tfds as tfds_source
from jaxft.errors import JaxftError

F = tfds.features
TAGS = ["O", "B-PER", "I-PER"]
ROWS = {  # split -> records, as tfds_source.load must return them (vec: a Tensor feature, checked apart)
    "train": [
        {"text": "a fine film", "label": 1, "tokens": ["Ann", "Lee", "smiled"], "tags": [1, 2, 0],
         "answers": {"text": ["Ann Lee"], "answer_start": [0]}, "score": 0.5, "flag": True, "id": 0},
        {"text": "dull, ünïcode ✓", "label": 0, "tokens": [], "tags": [],
         "answers": {"text": [], "answer_start": []}, "score": -1.25, "flag": False, "id": 1},
        {"text": "", "label": 2, "tokens": ["Bo"], "tags": [1],
         "answers": {"text": ["x", "y z"], "answer_start": [3, 7]}, "score": 0.0, "flag": False, "id": 2},
    ],
    "test": [
        {"text": "ok", "label": 1, "tokens": ["ok"], "tags": [0],
         "answers": {"text": ["ok"], "answer_start": [0]}, "score": 2.0, "flag": True, "id": 0},
    ],
}


class ToyDs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Text + ClassLabel, NER-like Sequences, SQuAD-like nested answers, scalars and a Tensor."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  code_path = None
  offset = 0  # 2.0.0 below: every id + 100

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=F.FeaturesDict({
        "text": F.Text(), "label": F.ClassLabel(names=["neg", "pos", "mixed"]),
        "tokens": F.Sequence(F.Text()), "tags": F.Sequence(F.ClassLabel(names=TAGS)),
        "answers": F.Sequence({"text": F.Text(), "answer_start": np.int32}),
        "score": np.float32, "flag": np.bool_, "id": np.int32,
        "vec": F.Tensor(shape=(2,), dtype=np.float32)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(rows) for split, rows in ROWS.items()}

  def _generate_examples(self, rows):
    for i, r in enumerate(rows):
      yield i, {**r, "id": r["id"] + self.offset, "vec": np.array([i, -i], np.float32)}


class ToyDsV2(ToyDs, skip_registration=True):
  name = "toy_ds"
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"2.0.0": "ids + 100."}
  offset = 100


def _prepare(cls, data_dir):
  cls(data_dir=str(data_dir)).download_and_prepare(
      file_format="array_record", download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  _prepare(ToyDs, d)
  _prepare(ToyDsV2, d)
  return d


def _strip_vec(splits):
  for rows in splits.values():
    for i, r in enumerate(rows):
      vec = r.pop("vec")
      assert isinstance(vec, np.ndarray) and vec.dtype == np.float32
      np.testing.assert_array_equal(vec, [i, -i])
  return splits


def test_records_round_trip_as_python(toy_dir):
  splits, names = tfds_source.load("toy_ds:1.0.0", toy_dir)
  assert set(splits) == {"train", "test"}
  assert _strip_vec(splits) == ROWS  # stored order, every feature decoded
  rec = splits["train"][0]
  assert type(rec["text"]) is str and type(rec["label"]) is int and type(rec["score"]) is float
  assert type(rec["flag"]) is bool and type(rec["tags"][0]) is int and type(rec["tokens"][0]) is str
  assert type(rec["answers"]["answer_start"][0]) is int
  assert names == {"label": ["neg", "pos", "mixed"], "tags": TAGS}


def test_version_pick(toy_dir):
  newest, _ = tfds_source.load("toy_ds", toy_dir)  # no version: the newest prepared one
  assert [r["id"] for r in newest["train"]] == [100, 101, 102]
  assert tfds_source.prepared_dir("toy_ds", toy_dir) == toy_dir / "toy_ds" / "2.0.0"
  old, _ = tfds_source.load("toy_ds:1.0.0", toy_dir)
  assert [r["id"] for r in old["train"]] == [0, 1, 2]


@pytest.mark.parametrize("name, version", [("nope_ds", "any"), ("toy_ds:3.0.0", "3.0.0"),
                                           ("vader_movie_reviews", "any")])
def test_missing_is_one_line_error_without_download(toy_dir, monkeypatch, name, version):
  def no_network(*a, **k):
    raise AssertionError("tried to build or download")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  monkeypatch.setattr(tfds, "data_source", no_network)
  monkeypatch.setattr(tfds, "builder", no_network)
  before = sorted(toy_dir.rglob("*"))
  with pytest.raises(JaxftError) as e:
    tfds_source.load(name, toy_dir)
  msg = str(e.value)
  assert "\n" not in msg and name in msg and f"version {version}" in msg and str(toy_dir) in msg
  assert ("jaxft built-in, prepared on first use" if name == "vader_movie_reviews" else "tfds build") in msg
  assert sorted(toy_dir.rglob("*")) == before  # nothing created (tfds.data_source would make dirs)


def test_bad_name_and_unknown_builtin(tmp_path):
  with pytest.raises(JaxftError, match="bad TFDS dataset name"):
    tfds_source.load("../etc:1", tmp_path)
  with pytest.raises(JaxftError, match="known: vader_movie_reviews, wnut16"):
    builtin.load("imdb", tmp_path)


def test_prepare_is_atomic(tmp_path):
  class Broken(ToyDs, skip_registration=True):
    name = "broken_ds"

    def _generate_examples(self, rows):
      yield 0, {**rows[0], "vec": np.zeros(2, np.float32)}
      raise RuntimeError("crash half-way")

  with pytest.raises(RuntimeError, match="half-way"):
    builtin.prepare(Broken, tmp_path)
  assert not any(tmp_path.rglob("dataset_info.json"))
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepare-")]
  assert tfds_source.prepared_dir("broken_ds", tmp_path) is None
  logs = []
  assert builtin.prepare(ToyDs, tmp_path, log=logs.append) == tmp_path / "toy_ds" / "1.0.0"
  assert len(logs) == 1 and "toy_ds 1.0.0 (4 examples)" in logs[0]
  assert _strip_vec(tfds_source.load("toy_ds", tmp_path)[0]) == ROWS


def _vader_raw():
  """The raw (texts, labels) of the vaderSentiment file, read directly, in file order."""
  import tarfile

  from jaxft import assets
  from jaxft.data.sources.builders import vader_movie_reviews as v
  with tarfile.open(assets.resolve(v.ASSET)) as t:
    lines = t.extractfile(v.MEMBER).read().decode("utf-8").splitlines()
  rows = [(float(x), s.strip()) for _, x, s in (line.split("\t", 2) for line in lines if line.strip())]
  return [s for x, s in rows if x != 0], [int(x > 0) for x, _ in rows if x != 0], [x for x, _ in rows if x != 0]


@pytest.mark.slow
@pytest.mark.registry
def test_builtin_vader_in_file_order(tmp_path):
  texts, labels, scores = _vader_raw()
  logs = []
  splits, names = builtin.load("vader_movie_reviews", tmp_path, log=logs.append)
  rows = splits["train"]
  assert list(splits) == ["train"] and len(rows) == 10_568 and names == {"label": ["negative", "positive"]}
  assert [r["text"] for r in rows] == texts and [r["label"] for r in rows] == labels
  assert [r["id"] for r in rows] == list(range(10_568))
  assert np.allclose([r["score"] for r in rows], scores, atol=1e-6) and min(scores) < -3.5 and max(scores) > 3.5
  assert len(logs) == 1 and "prepared built-in dataset vader_movie_reviews 1.1.0" in logs[0]
  info = tmp_path / "vader_movie_reviews" / "1.1.0" / "dataset_info.json"
  mtime = info.stat().st_mtime_ns
  again, _ = builtin.load("vader_movie_reviews", tmp_path, log=logs.append)
  assert len(logs) == 1 and info.stat().st_mtime_ns == mtime and again == splits


@pytest.mark.slow
@pytest.mark.registry
def test_builtin_wnut16_counts(tmp_path):
  from jaxft.data.sources.builders.wnut16 import TAGS as WNUT_TAGS
  splits, names = builtin.load("wnut16", tmp_path, log=lambda m: None)
  rows = splits["train"]
  assert len(rows) == 2_394 and sum(len(r["tokens"]) for r in rows) == 46_469
  assert all(len(r["tokens"]) == len(r["tags"]) > 0 for r in rows)
  assert names == {"tags": WNUT_TAGS} and WNUT_TAGS[0] == "O"
  assert len({WNUT_TAGS[t][2:] for r in rows for t in r["tags"] if t}) == 10
  assert rows[0]["tokens"][:3] == ["@paulwalk", "It", "'s"] and [r["id"] for r in rows] == list(range(2_394))
