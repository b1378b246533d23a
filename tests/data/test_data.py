import numpy as np
import pytest

from jaxft.config import load_config
from jaxft.data import batching, sources
from jaxft.errors import JaxftError
from jaxft.tasks.base import Examples, pad_tokens


def encoded(n=200, seed=0):
  rng = np.random.default_rng(seed)
  ids = [rng.integers(5, 50, size=rng.integers(3, 60)).astype(np.int32) for _ in range(n)]
  return Examples(np.array([len(x) for x in ids]), {"ids": ids})


def collate(ex, idx, length, batch_size, epoch=None, seed=None):
  ids, mask = pad_tokens(ex.fields["ids"], idx, length, batch_size, 0)
  return {"input_ids": ids, "attention_mask": mask}


def test_batches_are_bucketed_and_cover_each_epoch_once():
  data = encoded()
  src = batching.bucketed(data, collate, 16, 24, seed=1, buckets=[16, 32, 64])
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


@pytest.mark.parametrize("workers", [1, 3])
def test_grain_iterator_state_resumes_exactly(workers):
  data = encoded()
  source = batching.bucketed(data, collate, 16, 30, seed=3, buckets=[64])
  it = iter(batching.train_dataset(source, workers))
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["input_ids"] for _ in range(5)]
  for e, i in zip(expected, range(7, 12)):  # in order, whatever the number of threads
    np.testing.assert_array_equal(source[i]["input_ids"], e)
  it2 = iter(batching.train_dataset(batching.bucketed(data, collate, 16, 30, seed=3, buckets=[64]), workers))
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["input_ids"], e)


def test_eval_batches_cover_everything_once_with_index():
  data = encoded(n=70)
  batches = list(batching.eval_batches(data, collate, 32, [16, 32, 64]))
  assert [b["input_ids"].shape[0] for b in batches] == [32, 32, 32]
  index = np.concatenate([b["index"] for b in batches])
  assert sorted(index[index >= 0]) == list(range(70)) and (index < 0).sum() == 26


def test_buckets_derived_from_max_length():
  assert batching.derived_buckets(64) == [16, 24, 32, 40, 48, 64]  # the default experiment's
  assert batching.derived_buckets(128) == [16, 24, 32, 40, 48, 64, 96, 128]
  assert batching.derived_buckets(80) == [16, 24, 32, 40, 48, 64, 80]
  assert batching.derived_buckets(384)[-3:] == [192, 256, 384] and batching.derived_buckets(10) == [10]
  cfg = load_config(None, ("data.max_length=256",))  # raising max_length alone is enough
  assert cfg.data.buckets is None
  with pytest.raises(JaxftError, match="'data.buckets' must be ascending and end at >= data.max_length"):
    load_config(None, ("data.max_length=256", "data.buckets=[16, 64]"))


def source(tmp_path, **files):
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  keys = {"train": "data.train", "validation": "data.validation", "test": "data.test"}
  overrides = ["data.name=files"] + [f"{keys[n.split('.')[0]]}={tmp_path / n}" for n in files]
  return sources.load(load_config(None, tuple(overrides)).data).splits


def test_missing_splits_come_off_train(tmp_path):
  rows = "".join(f"text {i},{i % 3}\n" for i in range(100))
  both = source(tmp_path, **{"train.csv": "text,label\n" + rows})
  assert [len(both[k]) for k in ("train", "validation", "test")] == [80, 10, 10]
  # only a test file: validation comes off train (0.1 / 0.9 of it), the test file is kept whole
  only_test = source(tmp_path, **{"train.csv": "text,label\n" + rows, "test.csv": "text,label\na,0\nb,1\n"})
  assert [len(only_test[k]) for k in ("train", "validation", "test")] == [89, 11, 2]
  assert only_test["test"] == [{"text": "a", "label": "0"}, {"text": "b", "label": "1"}]
  only_val = source(tmp_path, **{"train.csv": "text,label\n" + rows, "validation.csv": "text,label\na,0\n"})
  assert [len(only_val[k]) for k in ("train", "validation", "test")] == [89, 1, 11]
  seen = [r["text"] for k in ("train", "validation") for r in only_test[k]]
  assert sorted(seen) == sorted(f"text {i}" for i in range(100))  # a partition of the train file


def test_file_formats(tmp_path):
  tsv = source(tmp_path, **{"train.tsv": "text\tlabel\na b\tx\nc d\ty\n"})
  assert tsv["train"][0]["text"] in ("a b", "c d")
  conll = source(tmp_path, **{"train.conll": "EU B-ORG\nrejects O\n\t\nPeter B-PER\n\nBlackburn B-PER\n"})
  assert sorted(map(str, conll["train"] + conll["validation"] + conll["test"])) == sorted(map(str, [
      {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}, {"tokens": ["Peter"], "tags": ["B-PER"]},
      {"tokens": ["Blackburn"], "tags": ["B-PER"]}]))
  squad = '{"data": [{"paragraphs": [{"context": "Paris is big.", "qas": [{"id": "q1", "question": "What?", ' \
          '"answers": [{"text": "Paris", "answer_start": 0}]}, {"id": "q2", "question": "Who?", "answers": [], ' \
          '"is_impossible": true}]}]}]}'
  qa = source(tmp_path, **{"train.json": squad, "validation.json": squad, "test.json": squad})
  assert qa["test"][0] == {"id": "q1", "context": "Paris is big.", "question": "What?",
                           "answers": {"text": ["Paris"], "answer_start": [0]}}
  assert qa["test"][1]["answers"] == {"text": [], "answer_start": []}
  with pytest.raises(JaxftError, match="asset not found: .*nope.jsonl"):
    sources.load(load_config(None, ("data.name=files", f"data.train={tmp_path / 'nope.jsonl'}")).data)
  with pytest.raises(JaxftError, match=r"train.jsonl:2: not valid JSON"):
    source(tmp_path, **{"train.jsonl": '{"a": 1}\n{oops\n'})
