"""The real all-MiniLM-L6-v2 through the pypi: resolver (cached in $JAXFT_CACHE after the first run)."""
import numpy as np
import pytest

from jaxft.config import load_config
from jaxft.models import load_model


@pytest.mark.slow
def test_minilm_mean_pooled_cosine():
  model = load_model(load_config(None, ("model.task=embedding",)), log=print)
  enc = model.tokenizer(["A man is eating food.", "A man eats something."], padding=True, return_tensors="np")
  batch = {k: np.asarray(v, np.int32) for k, v in enc.items()}
  hidden_BxLxD = np.asarray(model.apply(model.params, batch))
  mask_BxLx1 = batch["attention_mask"][..., None]
  emb_BxD = (hidden_BxLxD * mask_BxLx1).sum(1) / mask_BxLx1.sum(1)
  cos = emb_BxD[0] @ emb_BxD[1] / np.linalg.norm(emb_BxD[0]) / np.linalg.norm(emb_BxD[1])
  assert abs(cos - 0.875) < 1e-3, cos
