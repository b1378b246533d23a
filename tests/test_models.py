import jax
import numpy as np
import pytest

from jaxft.errors import JaxftError
from jaxft.models import hf


def test_pytorch_safetensors_and_flax_msgpack_load_the_same_weights(tiny_bert):
  logs = []
  pt = hf.load(tiny_bert["pt"], "classification", num_labels=3, log=logs.append)
  fx = hf.load(tiny_bert["flax"], "classification", num_labels=3, log=logs.append)
  assert "pytorch weights" in logs[0] and "flax msgpack" in logs[1]
  assert "unused checkpoint keys: embeddings/position_ids" in logs[0]
  assert "newly initialised: classifier/{bias,kernel}" in logs[0]
  base = tiny_bert["params"]
  for tree in (pt.params, fx.params):
    chex_equal = jax.tree.map(np.array_equal, tree["bert"], base)
    assert all(jax.tree.leaves(chex_equal))
    assert tree["classifier"]["kernel"].shape == (32, 3)


def test_apply_gives_logits_and_embeddings(tiny_bert):
  batch = {"input_ids": np.array([[2, 5, 6, 3]], np.int32), "attention_mask": np.ones((1, 4), np.int32)}
  cls = hf.load(tiny_bert["pt"], "classification", num_labels=2, log=lambda _: None)
  assert cls.apply(cls.params, batch).shape == (1, 2)
  emb = hf.load(tiny_bert["pt"], "embedding", log=lambda _: None)
  assert emb.apply(emb.params, batch).shape == (1, 4, 32)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(JaxftError, match="no config.json"):
    hf.load(tmp_path, "classification")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(JaxftError, match="no weights in"):
    hf.load(tmp_path, "classification")
