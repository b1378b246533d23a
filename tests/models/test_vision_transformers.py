"""ResNet and ViT through transformers' Flax classes, on tiny random checkpoints the tests write: logits equal
FlaxResNetForImageClassification's / FlaxViTForImageClassification's, and ResNet's BatchNorm statistics
train (or stay, in frozen stages) like EfficientNet's."""
import jax
import numpy as np
import pytest
from test_image_classification import cfg_for, vision  # noqa: F401  (the image folders fixture)

from jaxft import rules
from jaxft.data import batching
from jaxft.experiment import build


def tiny(kind, root):
  import transformers
  if kind == "resnet":
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 2, 1],
                                       layer_type="basic", num_labels=3)
    model = transformers.FlaxResNetForImageClassification(config, seed=0)
  else:
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    model = transformers.FlaxViTForImageClassification(config, seed=0)
  model.save_pretrained(root / kind)
  return model


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_logits_equal_transformers_classes(vision, tmp_path, kind):  # noqa: F811
  hf = tiny(kind, tmp_path)
  exp = build(cfg_for(vision, tmp_path / "run", f"model.name={tmp_path / kind}"))
  assert exp.backbone.key == hf.base_model_prefix and exp.backbone.processor.size == 32
  batch = exp.task.collate(exp.splits["test"], np.arange(6), 1, 6)
  head = hf.params["params"]["classifier"] if kind == "resnet" else hf.params["classifier"]
  head = head["1"] if kind == "resnet" else head  # ResNet's head: Flatten, then Dense "1"
  params = {**exp.initial_state().params, "classifier": head}
  logits, _ = exp.apply(params, batch, False, None, exp.initial_state().model_state)
  pixels = ((batch["image"] / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
  want = hf(pixels.transpose(0, 3, 1, 2).astype(np.float32)).logits
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_resnet_batchnorm_trains_and_frozen_stages_keep_theirs(vision, tmp_path):  # noqa: F811
  tiny("resnet", tmp_path)
  exp = build(cfg_for(vision, tmp_path / "run", f"model.name={tmp_path / 'resnet'}", "freeze_bottom_layers=1"))
  step = jax.jit(exp.train_step(0))
  batches = batching.bucketed(exp.splits["train"], exp.task.collate, 8, 2, 0, [1])
  state = exp.initial_state()
  for i in range(2):  # step 0's LR is 0 (warmup)
    state, _ = step(state, {k: v for k, v in batches[i].items() if k != "index"})
  before, after = rules.flat(exp.initial_state().model_state), rules.flat(state.model_state)
  assert len(before) == 2 * len(exp.backbone.batch_norm) > 8
  for p in before:  # the stem (embedder) and stage 0 keep theirs
    kept = "/embedder/" in f"/{p}" or "/stages/0/" in p
    assert np.array_equal(before[p], after[p]) == kept, p
  params0, params1 = rules.flat(exp.initial_state().params), rules.flat(state.params)
  for p in params0:
    kept = p.startswith("resnet/embedder/") or p.startswith("resnet/encoder/stages/0/")
    assert np.array_equal(params0[p], params1[p]) == kept, p
