"""Backbone providers: one registry of model families.

A family module (a file here and a line in FAMILIES) exports
  NAME         its name in logs and errors
  claims(found) -> bool   whether it reads the checkpoint `found` describes
  open(found) -> Opened   what it is, read before the weights: config, input length bound, pooling
  load(path, mcfg, compute_dtype, seed, platform, pooler, config) -> (Backbone, one-line report)
  TAKES        the model.* keys only some families take: {key: (check(value, cfg), the error if it fails)}
  CONVENTIONS  its param-path conventions (freezing, layer decay, TP, LoRA)
Every family is jaxft's own Flax module (transformers is read for configs and tokenizers only). Their claims
are disjoint (tests/models/test_models.py checks every fixture).
"""
from jaxft import assets
from jaxft.errors import JaxftError
from jaxft.models import bert, dinov2, distilbert, efficientnet, llama, modernbert, mpnet, resnet, vit
from jaxft.models.base import Backbone, Found, Opened

FAMILIES = (bert, distilbert, mpnet, modernbert, llama, efficientnet, vit, dinov2, resnet)  # order does not matter: their claims are disjoint
FAMILY_KEYS = {key: [f.NAME for f in FAMILIES if key in f.TAKES] for f in FAMILIES for key in f.TAKES}


def check_keys(cfg) -> None:
  """The values set for the family keys, each checked as the families that take it say (config.validate)."""
  checks = {key: check for f in FAMILIES for key, check in f.TAKES.items()}
  for key, (ok, error) in checks.items():
    value = getattr(cfg.model, key)
    if value is not None and not ok(value, cfg):
      raise JaxftError(f"config key 'model.{key}' {error}, got {value!r}")


def family(found: Found):
  """The family module that reads `found`, or a one-line error saying why none does."""
  (own, *more) = [f for f in FAMILIES if f.claims(found)] or [None]
  assert not more, f"{found.path} is claimed by {own.NAME} and {more[0].NAME}: family claims must be disjoint"
  if own is not None:
    return own
  if found.path.is_file():
    raise JaxftError(f"{found.path}: no jaxft family reads this file: a bare weights file is an EfficientNet-Lite "
                     f"state dict (with '_conv_stem.weight') or a Llama GGUF; other models are checkpoint directories")
  if found.model_type is None:
    raise JaxftError(f"not a Hugging Face checkpoint directory (no config.json with a model_type): {found.path}")
  raise JaxftError(f"{found.path}: no jaxft family computes {found.model_type!r} models; jaxft's families: "
                   f"{', '.join(known_model_types())}")


def known_model_types() -> list[str]:
  """The Hugging Face model_types some family claims."""
  return [t for f in FAMILIES for t in getattr(f, "MODEL_TYPES", ())]


def open(mcfg) -> Opened:
  """The checkpoint model.name names, resolved, claimed and described once (before its weights load); a
  family key (FAMILY_KEYS) set for a family that does not take it is an error."""
  found = Found(assets.resolve(mcfg.name))
  fam = family(found)
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
