"""Model providers. `load_model` resolves the reference, then loads through the provider."""
from jaxft import assets
from jaxft.models.hf import Model, load as load_hf


def load_model(cfg, num_labels=None, log=print) -> Model:
  return load_hf(assets.resolve(cfg.model.name), cfg.model.task, num_labels, cfg.model.pooling,
                 seed=cfg.seed, log=log, compute_dtype=cfg.precision.compute, remat=cfg.model.remat,
                 impl=cfg.model.impl)
