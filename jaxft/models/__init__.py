"""Backbone providers by family. A native family is a module here and one line in FAMILIES
(keyed by the checkpoint's `model_type`); every other family computes with transformers' Flax class.
Families transformers has no class for read their own checkpoints: one line in OWN_FORMAT."""
from jaxft import assets
from jaxft.errors import JaxftError
from jaxft.models import bert, efficientnet, hf_checkpoint, hf_flax, llama
from jaxft.models.base import Backbone, max_positions, tokenizer_path

FAMILIES = {"bert": bert}  # model_type -> provider module with supports(config), load(ckpt, mcfg, ...), CONVENTIONS
# Provider modules that read their checkpoints themselves: claims(path, impl), max_length(path),
# load(path, mcfg, dtype, seed, platform), MODEL_TYPE, CONVENTIONS.
OWN_FORMAT = (efficientnet, llama)


def own_format(path, impl: str = "auto"):
  """The OWN_FORMAT family that claims the checkpoint at `path` (given model.impl), or None (a checkpoint
  transformers' Flax classes compute)."""
  return next((family for family in OWN_FORMAT if family.claims(path, impl)), None)


def pooling_hint(mcfg) -> str:
  """How the checkpoint was trained to be pooled, read before it loads: 'mean' for sentence-transformers
  checkpoints, else 'cls' (a task decides from it whether the backbone keeps its pooler)."""
  path = assets.resolve(mcfg.name)
  return "cls" if own_format(path, mcfg.impl) else hf_checkpoint.pooling(path)


def check_length(mcfg, length: int, what: str) -> None:
  """Inputs of `length` tokens (set by `what`) must fit the position embeddings of the model `mcfg` names:
  read from its config, before the weights load."""
  path = assets.resolve(mcfg.name)
  own = own_format(path, mcfg.impl)
  limit = own.max_length(path) if own else max_positions(hf_checkpoint.read_config(path))
  if limit and length > limit:
    raise JaxftError(f"{what}={length} is longer than {path} has position embeddings for ({limit})")


def load(mcfg, seed: int, compute_dtype: str = "float32", pooler: bool = False, log=print, platform: str = "cpu"
         ) -> Backbone:
  """The backbone named by `mcfg.name`: jaxft's implementation of its family where it has one and
  `mcfg.impl` allows it (auto | jaxft), else transformers' Flax module. platform: what its programs are
  compiled for ('cpu', 'gpu', 'tpu'), where a family computes differently per platform."""
  path = assets.resolve(mcfg.name)
  own = own_format(path, mcfg.impl)
  if (mcfg.scan_layers or mcfg.layers) and getattr(own, "MODEL_TYPE", None) != "llama":
    key = "scan_layers" if mcfg.scan_layers else "layers"
    raise JaxftError(f"model.{key}: only jaxft's llama family takes it yet; {path} is not a Llama model")
  if own is not None:
    if mcfg.impl == "transformers":
      raise JaxftError(f"model.impl=transformers: only jaxft's {own.MODEL_TYPE} module reads {path}; use "
                       f"model.impl=auto")
    backbone, report = own.load(path, mcfg, compute_dtype, seed, platform)
    log(f"loaded {own.MODEL_TYPE} from {path} (jaxft module): {report}")
    return backbone
  config = hf_checkpoint.read_config(path)
  family = FAMILIES.get(config.model_type)
  native = mcfg.impl != "transformers" and family is not None and family.supports(config)
  if mcfg.impl == "jaxft" and not native:
    raise JaxftError(f"model.impl=jaxft: no jaxft implementation of {config.model_type!r} models "
                     f"({path}); use model.impl=transformers")
  ckpt = hf_checkpoint.load(path, config, pooler, seed, compute_dtype, mcfg.weights, tokenizer_path(mcfg, path))
  provider = family if native else hf_flax
  backbone = provider.load(ckpt, mcfg, compute_dtype, pooler)
  log(f"loaded {config.model_type} from {path} ({'jaxft' if native else 'transformers'} module): {ckpt.report}")
  return backbone
