"""Sequence packing: the plan, packed batches, and packed losses and gradients equal to unpacked ones."""
import jax
import numpy as np
import pytest
from test_token_classification import write_ner

from jaxft.data import batching, packing
from jaxft.errors import JaxftError
from jaxft.experiment import PACK_SLOTS, build


def test_plan_places_every_example_once_within_rows():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 65, 200)
  idx = rng.choice(200, 32, replace=False)
  p = packing.plan(idx, lengths, 64, slots=4, multiple=4)
  assert sorted(i for row in p.rows for i, _, _ in row) == sorted(idx)
  assert p.num_rows % 4 == 0
  for row in p.rows:
    assert len(row) <= 4 and [k for _, k, _ in row] == list(range(len(row)))
    ends = [offset + lengths[i] for i, _, offset in row]
    assert max(ends, default=0) <= 64 and all(o == (ends[j - 1] if j else 0) for j, (_, _, o) in enumerate(row))
  assert p.num_rows < 32  # short examples share rows
  ids, segments, positions = packing.tokens([np.arange(n) + 1 for n in lengths], p, 0)
  assert (segments > 0).sum() == lengths[idx].sum() and ((ids > 0) == (segments > 0)).all()
  assert (positions[segments > 0] == ids[segments > 0] - 1).all()  # positions restart per example


def grads_and_loss(exp, batch):
  def loss(params):
    return exp.task.loss(exp.apply(params, batch, False)[0], batch)[0]
  return jax.value_and_grad(loss)(exp.initial_state().params)


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_packed_loss_and_gradients_equal_unpacked(tiny_cfg, tmp_path, task):
  extra = () if task == "sequence_classification" else (
      "task.name=token_classification", f"data.train={tmp_path / 't.conll'}",
      "data.validation=null", "data.test=null")
  write_ner(tmp_path / "t.conll", 64, 0)
  exp = build(tiny_cfg(*extra), log=lambda *_: None)
  ex = exp.splits["train"]
  idx = np.arange(16)
  unpacked = batching.collate(ex, idx, [32], exp.task.collate)
  packed = batching.collate_packed(ex, idx, exp.task.collate_packed, 32, PACK_SLOTS, 2)
  assert packed["input_ids"].shape[0] < 16  # examples really share rows
  assert packed["weights"].sum() == unpacked["weights"].sum()
  (loss_u, grads_u), (loss_p, grads_p) = grads_and_loss(exp, unpacked), grads_and_loss(exp, packed)
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_p, grads_u)


def test_packed_train_batches_cover_each_epoch_once(tiny_cfg):
  exp = build(tiny_cfg(), log=lambda *_: None)
  assert exp.pack  # the default where the task and model can
  src = exp.train_batches()
  seen = np.concatenate([src[i]["index"].ravel() for i in range(src.steps_per_epoch)])
  seen = seen[seen >= 0]
  assert len(seen) == len(set(seen)) == src.steps_per_epoch * 16
  for i in range(3):
    b = src[i]
    assert b["input_ids"].shape[1] == 32 and b["input_ids"].shape[0] % 2 == 0 and b["weights"].sum() == 16


def test_pack_where_it_cannot(tiny_cfg):
  assert not build(tiny_cfg("task.pooling=cls"), log=lambda *_: None).pack  # null: buckets instead
  with pytest.raises(JaxftError, match="data.pack.*task.pooling cls"):
    build(tiny_cfg("task.pooling=cls", "data.pack=true"), log=lambda *_: None)
  assert not build(tiny_cfg("data.pack=false"), log=lambda *_: None).pack


def test_packed_evaluation_equals_unpacked(tiny_cfg):
  exp = build(tiny_cfg("train.eval_batch_size=8"), log=lambda *_: None)
  assert exp.pack and exp.task.packs_eval
  shapes, seen = set(), []
  for b in exp.eval_batches("validation"):
    shapes.add(b["input_ids"].shape)
    seen += list(b["index"][b["index"] >= 0])
  assert shapes == {(8, 32)}  # one shape: eval_batch_size rows of data.max_length
  assert sorted(seen) == list(range(len(exp.splits["validation"])))  # every example once

  from jaxft.evaluate import evaluate, feature_table
  from jaxft.experiment import setup
  par, targets = setup(exp, lambda *_: None)
  state = par.put_state(exp.initial_state(), targets[0])
  step = par.compile_eval(exp.eval_step(), targets[0])
  features = par.compile_eval(exp.features, targets[0])
  packed = evaluate(exp, par, step, state.params, state.model_state, "validation")
  table_p = feature_table(exp, par, features, state.params, state.model_state, "validation")
  exp.pack = False
  unpacked = evaluate(exp, par, step, state.params, state.model_state, "validation")
  table_u = feature_table(exp, par, features, state.params, state.model_state, "validation")
  assert packed.keys() == unpacked.keys() and packed["accuracy"] == unpacked["accuracy"]
  np.testing.assert_allclose(packed["loss"], unpacked["loss"], rtol=1e-5)
  np.testing.assert_allclose(table_p, table_u, rtol=1e-4, atol=1e-6)
