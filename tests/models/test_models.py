import jax
import numpy as np
import pytest

from jaxft import models
from jaxft.config import load_config
from jaxft.errors import JaxftError


def load(path, **kw):
  logs = []
  cfg = load_config(None, (f"model.name={path}",) + tuple(f"model.{k}={v}" for k, v in kw.items()))
  return models.load(cfg.model, seed=0, log=logs.append), logs[0]


def test_pytorch_safetensors_and_flax_msgpack_load_the_same_weights(tiny_bert):
  pt, pt_log = load(tiny_bert["pt"])
  fx, fx_log = load(tiny_bert["flax"])
  assert "model.safetensors (pytorch names)" in pt_log and "flax_model.msgpack (flax names)" in fx_log
  # the checkpoints hold a pooler; without one asked for, its weights are reported unused
  assert "unused checkpoint keys: embeddings/position_ids, pooler/dense/{bias,kernel}" in pt_log
  assert "newly initialised: none" in pt_log
  for backbone in (pt, fx):
    assert backbone.key == "bert" and backbone.hidden_size == 32 and backbone.num_layers == 4
    base = {k: v for k, v in tiny_bert["params"].items() if k != "pooler"}
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, backbone.params, base)))


def test_checkpoint_without_a_param_reports_it_new(tiny_bert, tmp_path):
  import shutil

  from safetensors.numpy import load_file, save_file
  shutil.copytree(tiny_bert["pt"], tmp_path / "m")
  weights = load_file(tmp_path / "m" / "model.safetensors")
  del weights["encoder.layer.3.output.dense.bias"]
  save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
  _, log = load(tmp_path / "m")
  assert "newly initialised: encoder/layer/3/output/dense/bias" in log


def test_hidden_states_and_pooler(tiny_bert):
  batch = {"input_ids": np.array([[2, 5, 6, 3]], np.int32), "attention_mask": np.ones((1, 4), np.int32)}
  backbone, _ = load(tiny_bert["pt"])
  out, state = backbone.apply(backbone.params, batch)
  assert out["hidden"].shape == (1, 4, 32) and out["pooled"] is None and state is None
  cfg = load_config(None, (f"model.name={tiny_bert['pt']}",))
  pooled = models.load(cfg.model, seed=0, pooler=True, log=lambda _: None)
  assert pooled.apply(pooled.params, batch)[0]["pooled"].shape == (1, 32)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(JaxftError, match="no config.json"):
    load(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(JaxftError, match="no weights file in"):
    load(tmp_path)
