"""Backbone providers: one registry of model families.

A family module (a file here and a line in FAMILIES) exports
  NAME         its name in logs and errors
  claims(found, impl) -> bool   whether it reads the checkpoint `found` describes (model.impl given)
  open(found) -> Opened         what it is, read before the weights: config, input length bound, pooling
  load(path, mcfg, compute_dtype, seed, platform, pooler, config) -> (Backbone, one-line report)
  TAKES        the model.* keys only some families take: {key: (check(value, cfg), the error if it fails)}
  CONVENTIONS  its param-path conventions (freezing, layer decay, TP, LoRA)
jaxft's own families claim disjoint sets of checkpoints (tests/models/test_models.py checks every fixture);
a Hugging Face directory that none of them claims is computed by transformers' Flax class (TRANSFORMERS:
the fallback, so it has no `claims`).
"""
from jaxft import assets
from jaxft.errors import JaxftError
from jaxft.models import bert, efficientnet, hf_flax, llama
from jaxft.models.base import Backbone, Found, Opened

FAMILIES = (bert, llama, efficientnet)  # jaxft's modules; order does not matter: their claims are disjoint
TRANSFORMERS = hf_flax  # any other Hugging Face directory (model.impl=auto | transformers)
FAMILY_KEYS = {key: [f.NAME for f in (*FAMILIES, TRANSFORMERS) if key in f.TAKES]
               for f in (*FAMILIES, TRANSFORMERS) for key in f.TAKES}


def check_keys(cfg) -> None:
  """The values set for the family keys, each checked as the families that take it say (config.validate)."""
  checks = {key: check for f in (*FAMILIES, TRANSFORMERS) for key, check in f.TAKES.items()}
  for key, (ok, error) in checks.items():
    value = getattr(cfg.model, key)
    if value is not None and not ok(value, cfg):
      raise JaxftError(f"config key 'model.{key}' {error}, got {value!r}")


def family(found: Found, impl: str = "auto"):
  """The family module that reads `found` under model.impl, or a one-line error saying why none does."""
  (own, *more) = [f for f in FAMILIES if f.claims(found, impl)] or [None]
  assert not more, f"{found.path} is claimed by {own.NAME} and {more[0].NAME}: family claims must be disjoint"
  if own is not None:
    if impl == "transformers":  # only a file no transformers class reads is claimed under it (GGUF, EfficientNet)
      raise JaxftError(f"model.impl=transformers: only jaxft's {own.NAME} module reads {found.path}; use model.impl=auto")
    return own
  if found.path.is_file():
    raise JaxftError(f"{found.path}: no jaxft family reads this file: a bare weights file is an EfficientNet-Lite "
                     f"state dict (with '_conv_stem.weight') or a Llama GGUF; other models are checkpoint directories")
  if found.model_type is None:
    raise JaxftError(f"not a Hugging Face checkpoint directory (no config.json with a model_type): {found.path}")
  if impl == "jaxft":
    raise JaxftError(f"model.impl=jaxft: no jaxft implementation of {found.model_type!r} models ({found.path}); "
                     f"use model.impl=transformers")
  return TRANSFORMERS


def open(mcfg) -> Opened:
  """The checkpoint model.name names, resolved, claimed and described once (before its weights load); a
  family key (FAMILY_KEYS) set for a family that does not take it is an error."""
  found = Found(assets.resolve(mcfg.name))
  fam = family(found, mcfg.impl)
  default = type(mcfg)()
  for key, owners in FAMILY_KEYS.items():
    if getattr(mcfg, key) != getattr(default, key) and fam.NAME not in owners:
      raise JaxftError(f"model.{key}: the {fam.NAME} family does not take it ({found.path}); it is a key of "
                       f"{' and '.join(owners)}")
  return fam.open(found)


def load(mcfg, seed: int, compute_dtype: str = "float32", pooler: bool = False, log=print, platform: str = "cpu"
         ) -> Backbone:
  """The backbone model.name names (open(mcfg).load(...))."""
  return open(mcfg).load(mcfg, seed, compute_dtype, pooler, log, platform)
