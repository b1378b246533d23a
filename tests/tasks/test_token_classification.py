"""Token classification: conlleval entity spans, entity F1 by hand, sub-token alignment, the loss, and a
tiny end-to-end NER run that must learn."""
import json
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NEGATIVE, POSITIVE, WORDS

from jaxft.data.sources import Source
from jaxft.errors import JaxftError
from jaxft.tasks import token_classification as tc
from jaxft.tasks.token_classification import TokenClassification, entities, entity_scores


def test_entities_conlleval_chunking():
  assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]
  assert entities(["B-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 1, 2)]  # B- always starts a new one
  assert entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 2)]  # a stray I- starts an entity
  assert entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 3)]  # type change
  assert entities(["O", "O"]) == [] and entities([]) == []


def test_entity_scores_by_hand():
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-LOC"]]
  # gold: PER(0,0-2) LOC(0,3) ORG(1,0); pred: PER(0,0-2) ORG(0,3) ORG(1,0) LOC(1,1): 2 right of 4 predicted, 3 gold
  s = entity_scores(gold, pred)
  assert s["entity_precision"] == pytest.approx(2 / 4) and s["entity_recall"] == pytest.approx(2 / 3)
  assert s["entity_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
  assert s["f1_PER"] == 1.0 and s["f1_LOC"] == 0.0 and s["f1_ORG"] == pytest.approx(2 * 0.5 * 1 / 1.5)
  # a partial span is a miss, not half a hit
  assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["entity_f1"] == 0.0
  assert entity_scores([["O"]], [["O"]])["entity_f1"] == 0.0  # nothing to find: 0, not a division error


@pytest.fixture(scope="module")
def subword_tokenizer(tmp_path_factory):
  from transformers import BertTokenizerFast
  path = tmp_path_factory.mktemp("tok")
  (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "play", "##ing",
                                             "the", "film", "paris"]) + "\n")
  return BertTokenizerFast.from_pretrained(path)


def task(tokenizer, records, max_length=16, **keys):
  cfg = types.SimpleNamespace(data=types.SimpleNamespace(max_length=max_length),
                              task=tc.Config(name="token_classification", **keys))
  backbone = types.SimpleNamespace(processor=tokenizer, name="tiny", hidden_size=8, init_scale=0.02,
                                   head_dropout=0.0)
  logs = []
  t = TokenClassification(cfg, backbone, Source({"train": records}, {}), log=logs.append)
  return t, logs


def test_a_runs_tag_order_maps_tags_by_name(subword_tokenizer):
  """Tags listed in another order than the run stored them: the run's order, tags indexed by name; a tag the run
  was not trained on is an error naming both lists."""
  from jaxft import labels
  records = [{"tokens": ["playing", "the", "film", "Paris"], "tags": ["B-ACT", "O", "O", "B-LOC"]}]
  t, logs = task(subword_tokenizer, records)
  labels.adopt(t, ["B-LOC", "O", "B-ACT", "I-ACT"], "the run", "train anew", logs.append)
  assert t.label_names == ["B-LOC", "O", "B-ACT", "I-ACT"] and "labels: in the order of the run" in logs[0]
  assert t.encode(records, "train").fields["labels"][0].tolist() == [-1, 2, -1, 1, 1, 0, -1]
  with pytest.raises(JaxftError, match=r"the labels \['O', 'B-ACT', 'B-LOC'\] include \['B-LOC'\], which the run was "
                                       r"not trained on \(its labels: \['O', 'B-ACT'\]\)"):
    labels.adopt(task(subword_tokenizer, records)[0], ["O", "B-ACT"], "the run", "train anew")


def test_labels_on_first_sub_token_only(subword_tokenizer):
  records = [{"tokens": ["playing", "the", "film", "Paris"], "tags": ["B-ACT", "O", "O", "B-LOC"]}]
  t, logs = task(subword_tokenizer, records)
  assert t.label_names == ["O", "B-ACT", "B-LOC"]
  ex = t.encode(records, "train")
  # [CLS] play ##ing the film paris [SEP]: play carries the word's tag, ##ing and the specials weigh 0
  assert ex.fields["ids"][0].tolist() == [2, 5, 6, 7, 8, 9, 3]
  assert ex.fields["labels"][0].tolist() == [-1, 1, -1, 0, 0, 2, -1]
  assert ex.meta["first"][0].tolist() == [1, 3, 4, 5] and not logs
  batch = t.collate(ex, np.array([0]), 8, 2)
  assert batch["weights"].tolist() == [[0, 1, 0, 1, 1, 1, 0, 0], [0] * 8]  # padding rows and tokens: 0
  assert batch["labels"].min() == 0  # ignored positions hold a valid class index, weighted 0
  # predictions are read at each word's first sub-token
  pred = np.array([0, 1, 0, 0, 0, 2, 0, 0])
  rows = {"pred": [pred]}
  sums = {"loss_sum": 0.0, "count": 1.0, "correct": 1.0}
  assert t.finalize(sums, rows, ex)["entity_f1"] == 1.0
  pred[2] = 2  # a later sub-token's prediction is ignored
  assert t.finalize(sums, {"pred": [pred]}, ex)["entity_f1"] == 1.0
  pred[1] = 0
  assert t.finalize(sums, {"pred": [pred]}, ex)["entity_recall"] == 0.5


def test_truncated_words_are_reported_and_count_as_o(subword_tokenizer):
  records = [{"tokens": ["playing", "the", "film", "paris"], "tags": ["B-ACT", "O", "O", "B-LOC"]}]
  t, logs = task(subword_tokenizer, records, max_length=4)  # [CLS] play ##ing [SEP]
  ex = t.encode(records, "test")
  assert ex.meta["first"][0].tolist() == [1, -1, -1, -1]
  assert logs == ["test: 3 of 4 words have no sub-token within data.max_length=4 (truncated or empty); "
                  "they count as predicted O"]
  out = t.finalize({"loss_sum": 0.0, "count": 1.0, "correct": 1.0}, {"pred": [np.array([0, 1, 0, 0])]}, ex)
  assert out["entity_precision"] == 1.0 and out["entity_recall"] == 0.5  # the cut-off LOC is missed


def test_loss_is_the_mean_over_weighted_tokens(subword_tokenizer):
  t, _ = task(subword_tokenizer, [{"tokens": ["the", "film"], "tags": ["B-X", "O"]}])
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
  batch = {"labels": jnp.array([[0, 1, 1]]), "weights": jnp.array([[0.0, 1.0, 1.0]])}
  loss, aux = t.loss(logits, batch)
  assert float(loss) == pytest.approx(-(np.log(0.1) + np.log(0.8)) / 2, rel=1e-5)
  assert float(aux["token_accuracy"]) == 0.5


def test_bad_tags_are_one_line_errors(subword_tokenizer, tmp_path):
  """Errors name the token's line in a CoNLL file (else the example and token); a stray I- is read as conlleval
  reads it, and said."""
  from jaxft.data.sources import files
  with pytest.raises(JaxftError, match=r"^train example 0 \(token 2\): tag 'PER' is not a BIO / IOB2 tag"):
    task(subword_tokenizer, [{"tokens": ["the", "film"], "tags": ["O", "PER"]}])
  conll = tmp_path / "ner.conll"
  conll.write_text("the\tO\nfilm\tB-X\n\nthe\tO\nfilm\tI-Y\nplaying\tLOC\n")
  cfg = types.SimpleNamespace(conll_columns=[0, 1])
  records = files._conll(conll, cfg)
  with pytest.raises(JaxftError, match=rf"^{conll}:6: tag 'LOC' is not a BIO / IOB2 tag \(O, B-TYPE, I-TYPE\)"):
    task(subword_tokenizer, records)
  t, logs = task(subword_tokenizer, records[:1])
  with pytest.raises(JaxftError, match=rf"^{conll}:5: tag 'I-Y' is not in the tag names \['O', 'B-X'\]"):
    t.encode(records, "validation")
  with pytest.raises(JaxftError, match="validation example 0: 2 tokens but 1 tags"):
    t.encode([{"tokens": ["the", "film"], "tags": ["O"]}], "validation")
  stray = [{"tokens": ["the", "film", "the"], "tags": ["I-X", "B-X", "I-X"]}, {"tokens": ["the", "film"], "tags": ["O", "I-Y"]}]
  t, logs = task(subword_tokenizer, stray)
  t.encode(stray, "train")
  assert logs == ["train: 2 I- tag(s) follow no B- or I- of their type (the first: train example 0 (token 1)); each "
                  "starts an entity, as conlleval reads them"]


def write_ner(path: Path, n: int, seed: int):
  """CoNLL sentences of the tiny vocabulary: positive words are B-POS entities, negative ones B-NEG."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n):
    words = list(rng.choice(WORDS[10:], size=rng.integers(2, 7)))
    for _ in range(rng.integers(1, 3)):
      words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE + NEGATIVE)))
    tags = ["B-POS" if w in POSITIVE else "B-NEG" if w in NEGATIVE else "O" for w in words]
    lines += [f"{w}\t{t}" for w, t in zip(words, tags)] + ["\t"]  # WNUT's separator: a lone tab
  path.write_text("\n".join(lines) + "\n")


def test_tiny_ner_learns_end_to_end(tiny_cfg, tmp_path):
  from jaxft.train import train
  for split, n, seed in (("train", 256, 0), ("test", 64, 1)):
    write_ner(tmp_path / f"{split}.conll", n, seed)
  cfg = tiny_cfg("task.name=token_classification", f"data.train={tmp_path / 'train.conll'}",
                 f"data.test={tmp_path / 'test.conll'}", "data.validation=null", "train.epochs=4",
                 "train.eval_every=16")
  test = train(cfg)
  assert test["entity_f1"] > 0.8 and test["token_accuracy"] > 0.9, test
  rows = [json.loads(l) for l in open(Path(cfg.run_dir) / "metrics.jsonl")]
  val = [r for r in rows if r["split"] == "validation"]
  assert val and {"entity_f1", "f1_POS", "f1_NEG", "token_accuracy"} <= set(val[-1])


def test_accumulation_weights_micro_batches_by_their_tokens(tiny_cfg, tmp_path):
  """Micro-batches hold different numbers of tagged tokens: accumulated, the step is still the whole
  batch's token mean (as it is across devices under pmap: tests/test_parallel.py)."""
  import jax

  from jaxft.data import batching
  from jaxft.experiment import build
  from jaxft.step import make_train_step
  write_ner(tmp_path / "train.conll", 128, 0)
  ner = ("task.name=token_classification", f"data.train={tmp_path / 'train.conll'}", "data.validation=null",
         "data.test=null", "train.batch_size=32")
  losses = {}
  for micro in (1, 4):
    exp = build(tiny_cfg(*ner, f"train.micro_batch_size={32 // micro}"), print)
    step = jax.jit(make_train_step(exp.apply, exp.task.loss, exp.tx, exp.labels, dropout=False, micro_steps=micro))
    batches = batching.bucketed(exp.splits["train"], exp.task.collate, 32, 3, 0, [32])
    state, losses[micro] = exp.initial_state(), []
    for i in range(3):
      state, m = step(state, batches[i])
      losses[micro].append(float(m["loss"]))
  tokens = [batches[0]["weights"][i::4].sum() for i in range(4)]
  assert len(set(tokens)) > 1  # the micro-batches really differ
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
