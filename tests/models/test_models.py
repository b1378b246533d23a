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
  assert "unused checkpoint keys: pooler/dense/{bias,weight}" in pt_log
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


def test_each_checkpoint_is_claimed_by_one_family_or_none(tiny_bert, tiny_llama, tmp_path):
  """Claims are explicit and disjoint: what each checkpoint kind is read by (every fixture of
  tests/fixtures/families too); a bare weights file that is no EfficientNet state dict is nobody's (not
  EfficientNet's by list order), and a Hugging Face model_type no family computes is one line naming them."""
  from safetensors.numpy import save_file
  from test_families import FAMILY, FIXTURES

  from jaxft.models.base import Found
  save_file({"_conv_stem.weight": np.zeros((32, 3, 3, 3), np.float32)}, str(tmp_path / "lite0.safetensors"))
  save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
  (gguf := tmp_path / "tiny.gguf").write_bytes(b"")  # claimed by its name; read only when it loads
  (gpt2 := tmp_path / "gpt2").mkdir()
  (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
  expected = {  # path: its family (an exception class: an error)
      tiny_bert["pt"]: "bert", tiny_llama["untied"]: "llama", gguf: "llama",
      tmp_path / "lite0.safetensors": "efficientnet_lite", tmp_path / "other.safetensors": JaxftError,
      tmp_path: JaxftError,  # a directory without config.json
      **{FIXTURES / name: family for name, family in FAMILY.items()}}
  for path, kind in expected.items():
    claimed = [f.NAME for f in models.FAMILIES if f.claims(Found(path))]
    assert len(claimed) <= 1, (path, claimed)
    if kind is JaxftError:
      with pytest.raises(JaxftError):
        models.family(Found(path))
    else:
      assert models.family(Found(path)).NAME == kind, path
  with pytest.raises(JaxftError, match=r"no jaxft family computes 'gpt2' models; jaxft's families: bert, roberta"):
    models.family(Found(gpt2))


def test_a_family_key_the_family_does_not_take_names_its_owners(tiny_bert):
  with pytest.raises(JaxftError, match=r"model.scan_layers: the bert family does not take it .* a key of llama"):
    load(tiny_bert["pt"], scan_layers="true")
  with pytest.raises(JaxftError, match=r"model.image_size: the bert family .* efficientnet_lite and vit and dinov2 and resnet"):
    load(tiny_bert["pt"], image_size=64)
