"""ResNet's BatchNorm statistics train (or stay, in frozen stages) like EfficientNet's; its outputs equal
transformers' in tests/models/test_families.py."""
import jax
import numpy as np
from test_families import checkpoint
from test_image_classification import cfg_for, vision  # noqa: F401  (the image folders fixture)

from jaxft import rules
from jaxft.data import batching
from jaxft.experiment import build


def test_resnet_batchnorm_trains_and_frozen_stages_keep_theirs(vision, tmp_path):  # noqa: F811
  path = checkpoint("resnet-basic", tmp_path)
  exp = build(cfg_for(vision, tmp_path / "run", f"model.name={path}", "freeze_bottom_layers=1"))
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
