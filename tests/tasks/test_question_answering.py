"""Question answering: SQuAD EM / F1 by hand, windows with a stride and their offsets, span decoding
across windows (max answer length, end >= start, context only, the null answer), collate, and a tiny
end-to-end run that must learn."""
import json
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NEGATIVE, POSITIVE, WORDS

from jaxft.data.sources import Source
from jaxft.errors import JaxftError
from jaxft.tasks import question_answering as qa
from jaxft.tasks.question_answering import QuestionAnswering, best_span, normalize_answer, squad_scores

QUESTION = "which word?"
CONTEXT = "The film playing in Paris. A film plays in Paris, playing."
# context tokens: the film play ##ing in paris . a film play ##s in paris [UNK] play ##ing .  (17)
# max_length 12, stride 2: [CLS] which word ? [SEP] + 6 context tokens + [SEP]; windows hold context
# tokens 0-5, 4-9, 8-13, 12-16, each at window positions 5-10


def test_squad_metrics_by_hand():
  assert normalize_answer("The  Eiffel-Tower, a tower!") == "eiffeltower tower"
  assert normalize_answer("an apple. THE end") == "apple end"
  s = squad_scores([["the Eiffel Tower"]], ["Eiffel tower."])  # articles, case, punctuation
  assert s == {"exact_match": 1.0, "f1": 1.0}
  # pred "eiffel tower in paris" vs gold "eiffel tower": 2 shared, precision 2/4, recall 2/2 -> F1 2/3
  s = squad_scores([["Eiffel Tower"]], ["the Eiffel Tower in Paris"])
  assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(2 / 3)
  # several gold answers: the best counts (pred "tower": F1 0.4, 2/3 and 0 against these)
  s = squad_scores([["Eiffel Tower in Paris", "tower Paris", "Louvre"]], ["tower"])
  assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(2 / 3)
  # repeated tokens count once each (pred "x b b" vs gold "b b c": 2 shared, P 2/3, R 2/3)
  assert squad_scores([["b b c"]], ["x b b"])["f1"] == pytest.approx(2 / 3)
  # unanswerable (no gold, or golds normalizing to nothing): 1 only for an empty prediction
  assert squad_scores([[]], [""]) == {"exact_match": 1.0, "f1": 1.0}
  assert squad_scores([["the"]], ["a"]) == {"exact_match": 1.0, "f1": 1.0}
  assert squad_scores([[]], ["Paris"]) == {"exact_match": 0.0, "f1": 0.0}
  assert squad_scores([["Paris"]], [""]) == {"exact_match": 0.0, "f1": 0.0}
  s = squad_scores([["Paris"], [], ["Eiffel Tower"]], ["Paris", "", "tower"])  # mean over questions
  assert s["exact_match"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp("qa_tok") / "vocab.txt"
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "which", "word", "?", "the", "film",
                             "play", "##ing", "paris", "##s", "in", ".", "a"]) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def tokenizer(vocab):
  from transformers import BertTokenizerFast
  return BertTokenizerFast.from_pretrained(Path(vocab).parent)


def record(text=None, id="q", context=CONTEXT, question=QUESTION, occurrence=0):
  starts = [i for i in range(len(context)) if context.startswith(text, i)] if text else []
  return {"id": id, "question": question, "context": context,
          "answers": {"text": [text] if text else [], "answer_start": starts[occurrence:occurrence + 1]}}


def task(tokenizer, train, max_length=12, stride=2, max_answer_length=30, splits=None, on_bad_span="error"):
  cfg = types.SimpleNamespace(data=types.SimpleNamespace(max_length=max_length),
                              task=qa.Config(name="question_answering", stride=stride, max_answer_length=max_answer_length,
                                             on_bad_span=on_bad_span))
  backbone = types.SimpleNamespace(processor=tokenizer, name="tiny", hidden_size=8, init_scale=0.02,
                                   head_dropout=0.0)
  logs = []
  return QuestionAnswering(cfg, backbone, Source({"train": train, **(splits or {})}, {}), log=logs.append), logs


def test_windows_with_stride_and_offsets(tokenizer):
  records = [record("plays in Paris"), record("playing", occurrence=1, id="q2"), record(None, id="q3"),
             record("Paris. A film plays", id="q4")]
  t, logs = task(tokenizer, records)
  ex = t.encode(records, "train")
  assert ex.meta["question"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
  assert ex.lengths.tolist() == [12, 12, 12, 11] * 4
  ids = ex.fields["ids"][2]
  assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "which", "word", "?", "[SEP]", "film", "play", "##s", "in",
                                                  "paris", "[UNK]", "[SEP]"]
  assert ex.fields["types"][2].tolist() == [0] * 5 + [1] * 7  # the real segment ids of a pair
  # "plays in paris" (context tokens 9-12) lies inside window 2 only; window 1 holds its first token
  # and window 3 its last: both cross a window boundary and target [CLS]
  assert ex.fields["start"][:4].tolist() == [0, 0, 6, 0] and ex.fields["end"][:4].tolist() == [0, 0, 9, 0]
  # the second "playing" (sub-tokens play ##ing, context tokens 14-15) is in the last window only
  assert ex.fields["start"][4:8].tolist() == [0, 0, 0, 7] and ex.fields["end"][4:8].tolist() == [0, 0, 0, 8]
  assert not ex.fields["start"][8:].any() and not ex.fields["end"][8:].any()  # unanswerable: [CLS]
  for w, text in ((2, "plays in Paris"), (7, "playing")):  # offsets map the tokens back to the text
    off = ex.meta["offsets"][w]
    assert CONTEXT[off[ex.fields["start"][w], 0]:off[ex.fields["end"][w], 1]] == text
  assert ex.meta["offsets"][2][:5].tolist() == [[-1, -1]] * 5 and ex.meta["offsets"][2][-1].tolist() == [-1, -1]
  assert ex.meta["offsets"][7][7].tolist() == [50, 54]  # "play" of the last "playing" (characters 50-57)
  # "Paris. A film plays" spans context tokens 5-10, 6 tokens that no window holds entirely
  assert not ex.fields["start"][12:].any()
  assert logs == ["train: 4 questions in 16 windows; 1 of 3 answers fit in no window of data.max_length=12 "
                  "(those windows target [CLS])"]
  assert ex.meta["answers"] == [["plays in Paris"], ["playing"], [], ["Paris. A film plays"]]
  assert ex.meta["id"] == ["q", "q2", "q3", "q4"] and ex.meta["context"][0] == CONTEXT


def test_collate_passes_segment_ids_and_masks_padding(tokenizer):
  records = [record("plays in Paris"), record("film", context="the film")]
  t, _ = task(tokenizer, records)
  ex = t.encode(records, "validation")
  batch = t.collate(ex, np.array([4, 2]), 12, 3)  # the short one ([CLS] which word ? [SEP] the film [SEP])
  assert batch["token_type_ids"].tolist() == [[0] * 5 + [1] * 3 + [0] * 4, [0] * 5 + [1] * 7, [0] * 12]
  assert batch["attention_mask"].tolist() == [[1] * 8 + [0] * 4, [1] * 12, [0] * 12]
  assert batch["input_ids"][0, 8:].tolist() == [0] * 4
  assert batch["start"].tolist() == [6, 6, 0] and batch["end"].tolist() == [6, 9, 0]
  assert batch["weights"].tolist() == [1, 1, 0]
  # padding tokens get ~-inf logits; the loss is the mean over real windows of (CE(start) + CE(end)) / 2
  w = {"kernel": jnp.zeros((8, 2)), "bias": jnp.zeros((2,))}
  start, end = t.head(w, jnp.zeros((3, 12, 8)), batch, False, None)
  assert start.shape == (3, 12) and float(start[0, 8]) < -1e8 and float(end[0, 7]) == 0.0
  loss, aux = t.loss((start, end), batch)
  assert float(loss) == pytest.approx((np.log(8) + np.log(12)) / 2, rel=1e-5)  # uniform over the real tokens
  sums = t.eval_sums((start, end), batch)
  assert float(sums["count"]) == 2 and float(sums["loss_sum"]) == pytest.approx(np.log(8) + np.log(12), rel=1e-5)
  hit = start.at[0, 6].set(5.0).at[1, 6].set(5.0)
  assert float(t.loss((hit, end.at[0, 6].set(5.0)), batch)[1]["span_accuracy"]) == 0.5


def test_best_span_rules():
  ctx = np.array([0, 0, 1, 1, 1, 1, 0], bool)
  start = np.array([9, 9, 1, 0, 3, 0, 9.0])  # [CLS], a question token and [SEP] score high: never picked
  end = np.array([9, 9, 0, 2, 0, 1, 9.0])
  assert best_span(start, end, ctx, 20, 30) == (4.0, 4, 5)  # end 3 (2) is before start 4 (3)
  assert best_span(start, end, ctx, 20, 1) == (3.0, 4, 4)  # 2 tokens too long
  assert best_span(start, end, ctx, 2, 30) == (4.0, 4, 5)  # starts 4 and 2, ends 3 and 5
  assert best_span(start, end, ctx, 1, 30) is None  # start 4, end 3 only
  assert best_span(start, end, np.zeros(7, bool), 20, 30) is None


def logits(ex, picks, length=16):
  """Rows of start / end logits per window (padded past the window with large values finalize must
  ignore): zeros, [CLS] at `cls`, and {window: [(start, end, value)]}."""
  rows = {"start": [], "end": []}
  for w, n in enumerate(ex.lengths):
    start, end = np.full(length, 50.0, np.float32), np.full(length, 50.0, np.float32)
    start[:n], end[:n] = 0.0, 0.0
    start[1:4], end[1:4] = 20.0, 20.0  # question tokens
    for s, e, v in picks.get(w, []):
      start[s], end[e] = v, v
    rows["start"].append(start)
    rows["end"].append(end)
  return rows


def test_finalize_decodes_across_windows(tokenizer):
  records = [record("plays in Paris"), record("playing", occurrence=1)]
  t, _ = task(tokenizer, records)
  ex = t.encode(records, "test")
  sums = {"loss_sum": 3.0, "count": 2.0}
  # q0: a weaker "film play" in window 0 (film play, 2 + 2) loses to "plays in paris" in window 2 (3 + 3);
  # q1: its best start "." (window 7, position 9) comes after its best end "," (6): "playing" (7-8) wins
  rows = logits(ex, {0: [(6, 7, 2.0)], 2: [(6, 9, 3.0)], 7: [(7, 8, 3.0), (9, 6, 5.0)]})
  assert t.predict(rows, ex) == ["plays in Paris", "playing"]
  assert t.finalize(sums, rows, ex) == {"loss": 1.5, "exact_match": 1.0, "f1": 1.0}
  t.cfg.task.max_answer_length = 3  # "plays in paris" is 4 tokens: window 2's best allowed span
  assert t.predict(rows, ex)[0] == "film play"
  t.cfg.task.max_answer_length = 30
  # no unanswerable training questions: the null score never wins, however high
  rows = logits(ex, {2: [(6, 9, 3.0)], 7: [(7, 8, 3.0)]})
  for w in range(8):
    rows["start"][w][0] = rows["end"][w][0] = 100.0
  assert t.predict(rows, ex) == ["plays in Paris", "playing"]


def test_null_answer_on_unanswerable_data(tokenizer):
  records = [record("plays in Paris"), record(None, id="none")]
  t, _ = task(tokenizer, records)
  assert t.has_null
  ex = t.encode(records, "test")
  rows = logits(ex, {2: [(6, 9, 3.0)], 4: [(5, 5, 2.0)]})  # best spans: 6 and 4
  for w in range(8):
    rows["start"][w][0] = rows["end"][w][0] = 2.5 + w  # null scores 5, 7, ...: the minimum (q0 5, q1 13) counts
  assert t.predict(rows, ex) == ["plays in Paris", ""]  # q0: span 6 > null 5; q1: null 13 > span 4
  rows["start"][2][6] = 2.0  # q0's span now scores 5: a tie is not beaten
  assert t.predict(rows, ex)[0] == "plays in Paris"
  rows["start"][2][6] = 1.0
  assert t.predict(rows, ex)[0] == ""
  assert t.finalize({"loss_sum": 0.0, "count": 8.0}, rows, ex) == {"loss": 0.0, "exact_match": 0.5, "f1": 0.5}


def test_config_errors_are_one_line(tokenizer, vocab):
  records = [record("plays in Paris")]
  # 12 tokens - 3 question tokens - 3 special tokens = 6 context tokens per window
  with pytest.raises(JaxftError, match=r"'task.stride' must be >= 0 and < 6.*got 6"):
    task(tokenizer, records, stride=6)
  # the longest question of any split counts: 12 - 5 - 3 = 4
  with pytest.raises(JaxftError, match=r"'task.stride' must be >= 0 and < 4.*got 4"):
    task(tokenizer, records, stride=4, splits={"test": [record("film", question="which word? which word")]})
  with pytest.raises(JaxftError, match="leaves no room for context"):
    task(tokenizer, records, max_length=6)
  with pytest.raises(JaxftError, match="no column 'answers'"):
    task(tokenizer, [{"question": "q", "context": "c"}])
  t, _ = task(tokenizer, records)
  with pytest.raises(JaxftError, match="test example 0: expected answers"):
    t.encode([{"question": "q", "context": "c", "answers": {"text": ["c"]}}], "test")
  slow = type("BertTokenizer", (), {"is_fast": False})()  # a Python tokenizer (transformers 5 has none for BERT)
  with pytest.raises(JaxftError, match="needs a fast tokenizer"):
    task(slow, records)


def test_answers_are_checked_against_their_context(tokenizer):
  """An answer_start past the context, negative, or where the text is not: an error naming the record, or with
  task.on_bad_span=skip the answer dropped with a count (a question left with none dropped, not unanswerable)."""
  def bad(start, text="Paris", **kw):
    r = record(text, **kw)
    r["answers"]["answer_start"] = [start]
    return r
  good = record("plays in Paris")
  t, _ = task(tokenizer, [good])
  for r, why in ((bad(500), "answer 'Paris' is not at answer_start 500 \\(the context has 58 characters\\)"),
                 (bad(-3), "answer 'Paris' is not at answer_start -3 \\(the context has 58 characters\\)"),
                 (bad(0), "answer 'Paris' is not at answer_start 0 \\(the context there reads 'The f'\\)")):
    with pytest.raises(JaxftError, match=f"^train example 1: {why}; fix the record, or set task.on_bad_span=skip"):
      t.encode([good, r], "train")
  two = record("plays in Paris", id="two")
  two["answers"] = {"text": ["plays in Paris", "Paris"], "answer_start": [two["answers"]["answer_start"][0], 2]}
  t, logs = task(tokenizer, [good], on_bad_span="skip")
  ex = t.encode([good, bad(500, id="gone"), two, record(None, id="none")], "train")
  assert ex.meta["id"] == ["q", "two", "none"] and ex.meta["answers"] == [["plays in Paris"]] * 2 + [[]]
  assert logs[0].startswith("[bold red]warning:[/] train: dropped 2 answer(s) not at their answer_start, and 1 "
                            "question(s) left with none (task.on_bad_span=skip; the first: train example 1: answer")
  # evaluation scores the texts: it keeps every question and answer, the misplaced one only has no span target
  t, logs = task(tokenizer, [good])
  ex = t.encode([good, bad(500, id="kept")], "validation")
  assert ex.meta["id"] == ["q", "kept"] and ex.meta["answers"] == [["plays in Paris"], ["Paris"]]
  assert logs[0].startswith("[bold red]warning:[/] validation: 1 answer(s) not at their answer_start (the first: "
                            "validation example 1: answer 'Paris'")


def write_qa(path: Path, n: int, seed: int, unanswerable: float):
  """Contexts of the tiny vocabulary; the answer is the one positive word, or none."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    words = [str(w) for w in rng.choice(WORDS[10:] + NEGATIVE, size=rng.integers(3, 30))]
    answers = {"text": [], "answer_start": []}
    if rng.random() >= unanswerable:
      k, word = int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE))
      words.insert(k, word)
      answers = {"text": [word], "answer_start": [len(" ".join(words[:k] + [""]))]}
    rows.append({"id": f"{seed}-{i}", "question": "which word is positive ?", "context": " ".join(words),
                 "answers": answers})
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_tiny_qa_learns_end_to_end(tiny_cfg, tmp_path):
  from jaxft.train import train
  for split, n, seed in (("train", 256, 0), ("test", 64, 1)):
    write_qa(tmp_path / f"{split}.jsonl", n, seed, unanswerable=0.2)
  cfg = tiny_cfg("task.name=question_answering", f"data.train={tmp_path / 'train.jsonl'}",
                 f"data.test={tmp_path / 'test.jsonl'}", "data.validation=null", "data.max_length=32",
                 "task.stride=8", "data.buckets=null", "train.epochs=3", "train.eval_every=16")
  test = train(cfg)
  assert test["f1"] > 0.8 and test["exact_match"] > 0.8, test
  rows = [json.loads(l) for l in open(Path(cfg.run_dir) / "metrics.jsonl")]
  val = [r for r in rows if r["split"] == "validation"]
  assert val and {"loss", "exact_match", "f1"} <= set(val[-1])
