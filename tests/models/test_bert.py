"""jaxft's BERT encoder: gradients, dropout, packed rows, and what it does not compute."""
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


def load(path, pooler=True):
  cfg = load_config(None, (f"model.name={path}",))
  return models.load(cfg.model, seed=0, pooler=pooler, log=lambda *_: None)


def test_gradients_equal_finite_differences(tiny_bert):
  """Outputs equal transformers' (tests/models/test_families.py); their gradients, along a random direction,
  equal the loss's central difference (float64 would be tighter; float32's rounding bounds it)."""
  enc = load(tiny_bert["pt"])
  b = batch(1)
  loss = lambda p: jnp.sum(enc.apply(p, b)[0]["pooled"] ** 2)  # noqa: E731
  grads = jax.grad(loss)(enc.params)
  leaves, tree = jax.tree.flatten(enc.params)
  rng = np.random.default_rng(0)
  noise = [rng.normal(size=x.shape) for x in leaves]
  norm = np.sqrt(sum((x ** 2).sum() for x in noise))
  direction = jax.tree.unflatten(tree, [(x / norm).astype(np.float32) for x in noise])  # a unit vector
  eps = 1e-2
  moved = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, enc.params, direction)  # noqa: E731
  numeric = (loss(moved(1)) - loss(moved(-1))) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-3)


def test_dropout_is_on_in_train_mode_only(tiny_bert):
  mine = load(tiny_bert["pt"])
  b, key = batch(2), jax.random.PRNGKey(0)
  train = [mine.apply(mine.params, b, True, jax.random.fold_in(key, i))[0]["hidden"] for i in range(2)]
  assert not np.allclose(train[0], train[1])
  np.testing.assert_array_equal(mine.apply(mine.params, b, True, jax.random.fold_in(key, 0))[0]["hidden"], train[0])
  assert not np.allclose(train[0], mine.apply(mine.params, b)[0]["hidden"])


def test_unsupported_model_errors(tmp_path, tiny_bert):
  import shutil
  shutil.copytree(tiny_bert["pt"], path := tmp_path / "rel")
  bert_config(position_embedding_type="relative_key").save_pretrained(path)
  with pytest.raises(JaxftError, match="bert encoder does not compute position_embedding_type 'relative_key'"):
    load(path)


def test_packed_rows_equal_separate_examples(tiny_bert):
  """Two examples packed in one row (segment ids, positions restarting at 0) get the hidden states they get
  alone: attention never crosses examples."""
  enc = load(tiny_bert["pt"], pooler=False)
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
