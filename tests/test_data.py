import numpy as np
import pytest

from jaxft.config import load_config
from jaxft.data import pipeline, text
from jaxft.errors import JaxftError


def encoded(n=200, seed=0):
  rng = np.random.default_rng(seed)
  ids = [rng.integers(5, 50, size=rng.integers(3, 60)).astype(np.int32) for _ in range(n)]
  return pipeline.Encoded(ids, rng.integers(0, 2, size=n).astype(np.int32))


def test_batches_are_bucketed_and_cover_each_epoch_once():
  data = encoded()
  src = pipeline.TrainBatches(data, 16, 24, seed=1, buckets=[16, 32, 64], pad_id=0)
  assert src.steps_per_epoch == 12
  seen = []
  for i in range(12):
    b = src[i]
    L = b["input_ids"].shape[1]
    assert L in (16, 32, 64) and b["input_ids"].shape == (16, L)
    lengths = b["attention_mask"].sum(1)
    assert lengths.max() <= L and (L == 16 or lengths.max() > {32: 16, 64: 32}[L])
    seen += [tuple(r[:n]) for r, n in zip(b["input_ids"], lengths)]
  assert len(set(seen)) == 12 * 16  # no example twice within an epoch
  assert not np.array_equal(src.epoch_plan(0), src.epoch_plan(1))  # reshuffled per epoch


def test_grain_iterator_state_resumes_exactly():
  data = encoded()
  ds = pipeline.train_dataset(data, 16, 30, seed=3, buckets=[64], pad_id=0)
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["input_ids"] for _ in range(5)]
  it2 = iter(pipeline.train_dataset(data, 16, 30, seed=3, buckets=[64], pad_id=0))
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["input_ids"], e)


def test_eval_batches_cover_everything_once_with_weights():
  data = encoded(n=70)
  batches = list(pipeline.eval_batches(data, 32, [16, 32, 64], 0))
  assert [b["input_ids"].shape[0] for b in batches] == [32, 32, 32]
  assert sum(b["weights"].sum() for b in batches) == 70


def test_files_with_columns_and_split(tmp_path):
  (tmp_path / "d.csv").write_text("review,stars\n" + "".join(f"text {i},{i % 3}\n" for i in range(100)))
  cfg = load_config(None, ("data.name=files", f"data.train={tmp_path / 'd.csv'}", "data.text_column=review",
                           "data.label_column=stars"))
  splits, names = text.load_splits(cfg.data)
  assert names == ["0", "1", "2"] and [len(splits[k][0]) for k in ("train", "validation", "test")] == [80, 10, 10]
  with pytest.raises(JaxftError, match=r"has no column 'text' \(columns: review, stars\)"):
    text.load_splits(load_config(None, ("data.name=files", f"data.train={tmp_path / 'd.csv'}")).data)
  with pytest.raises(JaxftError, match=r"label\(s\) \['2'\] not in data.label_names"):
    text.load_splits(load_config(None, ("data.name=files", f"data.train={tmp_path / 'd.csv'}",
                                        "data.text_column=review", "data.label_column=stars",
                                        "data.label_names=['0','1']")).data)


def test_tsv_and_missing_file(tmp_path):
  (tmp_path / "d.tsv").write_text("text\tlabel\na b\tx\nc d\ty\n")
  cfg = load_config(None, ("data.name=files", f"data.train={tmp_path / 'd.tsv'}", f"data.validation={tmp_path / 'd.tsv'}",
                           f"data.test={tmp_path / 'd.tsv'}"))
  splits, names = text.load_splits(cfg.data)
  assert splits["train"][0] == ["a b", "c d"] and names == ["x", "y"]
  with pytest.raises(JaxftError, match="asset not found: .*nope.jsonl"):
    text.load_splits(load_config(None, ("data.name=files", f"data.train={tmp_path / 'nope.jsonl'}")).data)
