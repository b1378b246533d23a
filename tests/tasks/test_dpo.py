"""dpo: the loss against a hand-computed case, the reference as the model loaded (a LoRA run starts at loss
log 2), packed pairs = one pair a row, one-line errors, and a run whose held-out reward accuracy rises."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxft, lm_overrides
from test_packing import grads_and_loss

from jaxft.config import load_config
from jaxft.data import batching
from jaxft.errors import JaxftError
from jaxft.experiment import PACK_SLOTS, build
from jaxft.tasks import dpo

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def pairs(sft_data, tmp_path_factory):
  """The sentiment SFT data as preference pairs: chosen the right word, rejected the other."""
  root = tmp_path_factory.mktemp("dpo_data")
  for split in ("train", "validation", "test"):
    rows = [json.loads(line) for line in (sft_data / f"{split}.jsonl").read_text().splitlines()]
    out = [{"prompt": r["prompt"], "chosen": r["response"],
            "rejected": "negative" if r["response"] == "positive" else "positive"} for r in rows]
    (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
  return root


@pytest.fixture
def dpo_cfg(tiny_llama, pairs, tmp_path):
  def make(*extra):
    return load_config(None, lm_overrides(tiny_llama["tied"], pairs, tmp_path / "run", "dpo")
                       + ("task.eval_examples=16",) + extra)
  return make


def test_loss_equals_a_hand_computed_case():
  """Two pairs in one row's two slots (slot 1 of row 0 empty in the second row): log-probabilities summed per
  side, h against the reference, -log sigmoid(beta h), IPO's per-token version and RPO's NLL term."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 6)).astype(np.int32)
  codes = np.array([[1, 1, 2, 3, 4, 4], [1, 2, 2, 0, 0, 0]], np.int32)  # (row 1: one pair, slot 1 empty)
  weights = np.array([[1, 1], [1, 0]], np.float32)
  reference = rng.normal(size=(2, 2, 2)).astype(np.float32)
  batch = {"labels": labels, "codes": codes, "weights": weights, "reference": reference}
  logp = np.take_along_axis(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), labels[..., None], -1)[..., 0]
  want = np.zeros((2, 2, 2))
  counts = np.zeros((2, 2, 2))
  for b in range(2):
    for p in range(6):
      if codes[b, p]:
        k, s = divmod(codes[b, p] - 1, 2)
        want[b, k, s] += logp[b, p]
        counts[b, k, s] += 1
  logps, n = dpo.pair_logps(jnp.asarray(logits), batch)
  np.testing.assert_allclose(logps, want, rtol=1e-5)
  np.testing.assert_array_equal(n, counts)
  beta = 0.3
  h = (want[..., 0] - reference[..., 0]) - (want[..., 1] - reference[..., 1])
  loss, got_h = dpo.preference(logps, n, reference, beta, "sigmoid")
  np.testing.assert_allclose(got_h, h, rtol=1e-5)
  np.testing.assert_allclose(loss, np.log1p(np.exp(-beta * h)), rtol=1e-5, atol=1e-7)
  c = np.maximum(counts, 1)
  mean_h = (want[..., 0] - reference[..., 0]) / c[..., 0] - (want[..., 1] - reference[..., 1]) / c[..., 1]
  np.testing.assert_allclose(dpo.preference(logps, n, reference, beta, "ipo")[0], (mean_h - 1 / (2 * beta)) ** 2,
                             rtol=1e-5, atol=1e-6)
  # RPO: plus alpha times the chosen answer's mean token NLL
  np.testing.assert_allclose(dpo.preference(logps, n, reference, beta, "sigmoid", 0.5)[0],
                             np.log1p(np.exp(-beta * h)) - 0.5 * want[..., 0] / c[..., 0], rtol=1e-5, atol=1e-6)


def test_pairs_share_a_row_and_the_reference_is_the_model_loaded(dpo_cfg):
  """Each pair is one segment of a row: the shared prompt once, then the chosen and the rejected answer as
  branches whose positions both continue the prompt's (only the answers are scored); the reference's
  log-probabilities are the loaded model's, so a LoRA policy (adapters at zero) starts at h = 0: loss log 2."""
  exp = build(dpo_cfg("lora.preset=all", "lora.rank=4"), **QUIET)
  ex, tok = exp.splits["train"], exp.backbone.processor
  batch = batching.collate(ex, np.arange(4), [64], exp.task.collate)
  seg, branch, pos = batch["segment_ids"][0], batch["branch_ids"][0], batch["position_ids"][0]
  assert set(seg[seg > 0]) == {1} and set(branch[seg > 0]) == {0, 1, 2}
  shared = int((branch[seg > 0] == 0).sum())
  assert pos[branch == 1][0] == pos[branch == 2][0] == shared  # both answers continue the prompt
  text = {s: tok.decode(batch["labels"][0][batch["codes"][0] == s]) for s in (1, 2)}
  assert {text[1].split("<")[0].strip(), text[2].split("<")[0].strip()} == {"positive", "negative"}, text
  assert np.all(ex.fields["reference"] < 0)
  loss, _ = grads_and_loss(exp, batch)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-5)


def test_shared_prompt_tree_equals_two_separate_sequences(dpo_cfg):
  """A pair's log-probabilities from its tree (one pass over the prompt, packed or not) equal those of
  prompt + chosen and prompt + rejected run as two ordinary sequences."""
  exp = build(dpo_cfg(), **QUIET)
  task, bb = exp.task, exp.backbone
  records = [json.loads(line) for line in open(exp.cfg.data.train).read().splitlines()[:6]]
  origins = [f"r{i}" for i in range(len(records))]
  want = np.zeros((len(records), 2))
  for s, convs in enumerate(task._sides(records, "train")):
    ids, targets, _, _ = task.tokenized(convs, origins, exp.cfg.data.max_length // 2, last_turn=True)
    for i, (x, t) in enumerate(zip(ids, targets, strict=True)):
      logits = bb.apply(bb.params, {"input_ids": jnp.asarray(x)[None]}, False, None, bb.state)[0]["logits"][0]
      logp = jax.nn.log_softmax(logits[:-1], -1)[np.arange(len(x) - 1), x[1:]]
      want[i, s] = float(jnp.sum(logp * t[1:]))
  ex = task.encode(records, "train")
  assert ex.lengths.sum() < sum(len(x) for x in ids) * 1.2  # the prompt once: about half of two sequences
  logps = jax.jit(lambda b: dpo.pair_logps(bb.apply(bb.params, b, False, None, bb.state)[0]["logits"], b)[0])
  one = logps(batching.collate(ex, np.arange(6), [128], task.collate))
  np.testing.assert_allclose(np.asarray(one)[:, 0], want, rtol=1e-5)
  packed = batching.collate_packed(ex, np.arange(6), task.collate_packed, 256, PACK_SLOTS, 2)
  index = packed["index"]
  np.testing.assert_allclose(np.asarray(logps(packed))[index >= 0], want[index[index >= 0]], rtol=1e-5)
  np.testing.assert_allclose(ex.fields["reference"], want, rtol=1e-5)


def test_packed_pairs_equal_one_pair_a_row(dpo_cfg):
  """Pairs packed several to a row give one pair a row's loss and gradients (at the start, policy = reference:
  the loss is log 2, its gradient is not)."""
  exp = build(dpo_cfg(), **QUIET)
  ex, idx = exp.splits["train"], np.arange(16)
  unpacked = batching.collate(ex, idx, [64], exp.task.collate)
  packed = batching.collate_packed(ex, idx, exp.task.collate_packed, 128, PACK_SLOTS, 2)  # (pairs of ~44 tokens)
  assert packed["input_ids"].shape[0] <= 8 and packed["weights"].sum() == unpacked["weights"].sum() == 16
  (loss_u, grads_u), (loss_p, grads_p) = grads_and_loss(exp, unpacked), grads_and_loss(exp, packed)
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_p, grads_u)


def test_bad_pairs_are_one_line_errors(dpo_cfg, tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  for split in ("train", "validation", "test"):
    (bad / f"{split}.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
  with pytest.raises(JaxftError, match=r"train.jsonl:1: no 'chosen' / 'rejected'"):
    build(dpo_cfg(f"data.train={bad / 'train.jsonl'}"), **QUIET)
  (bad / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": 3}) + "\n")
  with pytest.raises(JaxftError, match=r"train.jsonl:1: 'prompt' \+ 'rejected' must be text"):
    build(dpo_cfg(f"data.train={bad / 'train.jsonl'}"), **QUIET)
  with pytest.raises(JaxftError, match="task.beta"):
    dpo_cfg("task.beta=0")


def test_dpo_run_learns_to_prefer_the_chosen_answers(tiny_llama, pairs, tmp_path):
  """Held-out reward accuracy and margin rise from the reference's 0 (policy = reference: loss log 2); the
  generated answers' exact match is reported (a random tiny model's greedy answers are no words at all)."""
  overrides = lm_overrides(tiny_llama["tied"], pairs, tmp_path / "run", "dpo") + (
      "task.eval_examples=16", "train.epochs=3", "optim.lr=3e-3", "task.beta=0.5")
  before = jaxft("eval", *overrides, "--json")
  assert before.returncode == 0, before.stderr[-2000:]
  r = jaxft("train", *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  after = jaxft("eval", *overrides, "--json")
  b, a = json.loads(before.stdout.splitlines()[-1]), json.loads(after.stdout.splitlines()[-1])
  assert b["reward_margin"] == pytest.approx(0.0, abs=1e-5) and b["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert a["reward_accuracy"] > 0.8 and a["reward_margin"] > 0.5 and a["loss"] < 0.5, (b, a)
  assert 0.0 <= a["exact_match"] <= 1.0 and "reward_accuracy" in r.stdout
