"""jaxft's BERT encoder computes what transformers' Flax BERT computes, on the same params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bert_config

from jaxft import models
from jaxft.config import load_config
from jaxft.errors import JaxftError


def batch(seed=0, B=3, L=12, vocab=25):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, L), np.int32)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  return {"input_ids": rng.integers(5, vocab, (B, L), dtype=np.int32), "attention_mask": mask,
          "token_type_ids": (np.arange(L) >= L // 2).astype(np.int32)[None].repeat(B, 0)}


def load(path, impl, pooler=True):
  cfg = load_config(None, (f"model.name={path}", f"model.impl={impl}"))
  return models.load(cfg.model, seed=0, pooler=pooler, log=lambda *_: None)


def both(path):
  return load(path, "jaxft"), load(path, "transformers")


@pytest.mark.parametrize("output", ["hidden", "pooled"])
def test_eval_outputs_equal_transformers(tiny_bert, output):
  mine, ref = both(tiny_bert["pt"])
  b = batch()
  got, want = mine.apply(mine.params, b)[0][output], ref.apply(ref.params, b)[0][output]
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_gradients_equal_transformers(tiny_bert):
  mine, ref = both(tiny_bert["pt"])
  b = batch(1)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, b)[0]["pooled"] ** 2)  # noqa: E731
  g_mine, g_ref = jax.grad(loss(mine))(mine.params), jax.grad(loss(ref))(ref.params)
  for a, r in zip(jax.tree.leaves(g_mine), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, r, atol=1e-6, rtol=1e-4)


def test_dropout_is_on_in_train_mode_only(tiny_bert):
  mine = load(tiny_bert["pt"], "jaxft")
  b, key = batch(2), jax.random.PRNGKey(0)
  train = [mine.apply(mine.params, b, True, jax.random.fold_in(key, i))[0]["hidden"] for i in range(2)]
  assert not np.allclose(train[0], train[1])
  np.testing.assert_array_equal(mine.apply(mine.params, b, True, jax.random.fold_in(key, 0))[0]["hidden"], train[0])
  assert not np.allclose(train[0], mine.apply(mine.params, b)[0]["hidden"])


def test_unsupported_model_errors(tmp_path):
  from conftest import write_tokenizer
  from transformers import FlaxBertModel
  path = tmp_path / "rel"
  FlaxBertModel(bert_config(position_embedding_type="relative_key"), seed=0).save_pretrained(path)
  write_tokenizer(path)
  with pytest.raises(JaxftError, match="model.impl=jaxft: no jaxft implementation of 'bert' models"):
    load(path, "jaxft")
  assert load(path, "transformers").key == "bert"  # transformers' module computes it


def test_packed_rows_equal_separate_examples(tiny_bert):
  """Two examples packed in one row (segment ids, positions restarting at 0) get the hidden states they get
  alone: attention never crosses examples."""
  enc = load(tiny_bert["pt"], "jaxft", pooler=False)
  rng = np.random.default_rng(0)
  a, b = rng.integers(5, 25, 5, dtype=np.int32), rng.integers(5, 25, 7, dtype=np.int32)
  alone = {"input_ids": np.zeros((2, 8), np.int32), "attention_mask": np.zeros((2, 8), np.int32)}
  for r, x in enumerate((a, b)):
    alone["input_ids"][r, :len(x)], alone["attention_mask"][r, :len(x)] = x, 1
  packed = {"input_ids": np.concatenate([a, b, [0, 0]])[None].astype(np.int32),
            "attention_mask": np.array([[1] * 12 + [0, 0]], np.int32),
            "segment_ids": np.array([[1] * 5 + [2] * 7 + [0, 0]], np.int32),
            "position_ids": np.array([list(range(5)) + list(range(7)) + [0, 0]], np.int32)}
  h_alone = enc.apply(enc.params, alone)[0]["hidden"]
  h_packed = enc.apply(enc.params, packed)[0]["hidden"]
  np.testing.assert_allclose(h_packed[0, :5], h_alone[0, :5], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(h_packed[0, 5:12], h_alone[1, :7], atol=1e-5, rtol=1e-5)
  crossed = dict(packed, segment_ids=np.array([[1] * 12 + [0, 0]], np.int32))  # one segment: attention crosses
  assert not np.allclose(enc.apply(enc.params, crossed)[0]["hidden"][0, 5:12], h_alone[1, :7], atol=1e-3)
