"""Hugging Face checkpoint directories on jaxft's own modules: config, tokenizer, and the weights file's
tensors mapped onto a module's variables by name.

A family's module is named as its checkpoints are (`encoder/layer/3/attention/self/query`), so one mapping
serves every family (`from_torch`): a PyTorch Linear's `weight` [out, in] is a Dense `kernel` [in, out], a
Conv's [O, I, H, W] a Conv `kernel` [H, W, I, O], an Embedding's `weight` an `embedding`, a LayerNorm's a
`scale`, BatchNorm's running statistics `batch_stats`; which one a `weight` is, the module's own variables
say. Flax msgpack files (transformers 4's Flax classes wrote them) are read by name. `save` writes the
inverse, model.safetensors in PyTorch names: transformers (PyTorch) and jaxft load it. Which checkpoint
tensors went unused and which variables are new is computed here, by comparing names.
"""
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft import assets, formats
from jaxft.errors import JaxftError
from jaxft.models.base import Opened, max_positions

# PyTorch buffers that are not weights (recomputed by the modules)
BUFFERS = ("position_ids", "token_type_ids", "inv_freq", "num_batches_tracked")
# a PyTorch leaf -> the Flax leaves it may be, in order (the first the module has is taken)
LEAVES = {"weight": ("kernel", "embedding", "scale", "weight"), "gamma": ("scale", "weight"), "beta": ("bias",),
          "running_mean": ("mean",), "running_var": ("var",)}
TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "mean": "running_mean",
              "var": "running_var"}


def read_config(path: Path):
  """transformers' config of the Hugging Face directory `path` (its config classes only: no model code)."""
  import transformers
  if not (path / "config.json").is_file():
    raise JaxftError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
  try:
    return transformers.AutoConfig.from_pretrained(path)
  except (OSError, ValueError, KeyError) as e:
    raise JaxftError(f"could not read {path / 'config.json'}: {str(e).splitlines()[0]}") from None


def config_of(found):
  """transformers' config of a Hugging Face directory, read once per checkpoint."""
  return found.once("hf_config", lambda: read_config(found.path))


def opened(found, family) -> Opened:
  """A Hugging Face directory described for `family`: its config, the length its position embeddings cover
  (a family with an offset, RoBERTa's, says so in max_length), and its pooling."""
  config = config_of(found)
  length = getattr(family, "max_length", max_positions)(config)
  return Opened(found.path, family, config.model_type, config, length, pooling(found.path, config))


def pooling(path: Path, config=None) -> str:
  """How the checkpoint was trained to be pooled: 'mean' for sentence-transformers checkpoints trained with
  mean pooling, else its config's `classifier_pooling` where it has one (ModernBERT's), else 'cls'."""
  pooling_cfg = path / "1_Pooling" / "config.json"
  if pooling_cfg.is_file():
    return "mean" if assets.json_object(pooling_cfg).get("pooling_mode_mean_tokens") else "cls"
  return "mean" if getattr(config, "classifier_pooling", None) == "mean" else "cls"


def tokenizer(path: Path, where: Path | None = None):
  """transformers' tokenizer of checkpoint `path`, read from `where` (model.tokenizer; default `path`)."""
  import transformers
  where = where or path
  try:
    return transformers.AutoTokenizer.from_pretrained(where)
  except (OSError, ValueError, KeyError) as e:
    said = f" from {where}" if where != path else " (model.tokenizer can name another)"
    raise JaxftError(f"could not load the tokenizer of {path}{said}: {str(e).splitlines()[0]}") from None


def fold(keys: list[str]) -> str:
  """'classifier/bias', 'classifier/kernel' -> 'classifier/{bias,kernel}'."""
  groups: dict[str, list[str]] = {}
  for k in sorted(keys):
    head, _, leaf = k.rpartition("/")
    groups.setdefault(head, []).append(leaf)
  return ", ".join(f"{h}/{{{','.join(v)}}}" if len(v) > 1 else f"{h}/{v[0]}" if h else v[0]
                   for h, v in groups.items())


def _to_flax(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 2:
    return np.ascontiguousarray(x.T)
  if leaf == "kernel" and x.ndim == 4:  # [O, I, H, W] -> [H, W, I, O]
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  return x


def from_torch(weights: dict, expected, prefix: str | None = None) -> tuple[dict, list[str]]:
  """({variable path tuple: array}, unused names) from a PyTorch state dict, onto the module variables
  `expected` ({('params' | 'batch_stats', *path): shape}); `prefix`: the base model's name in checkpoints
  of a model with a head ('bert' in `bert.encoder.layer.0...`), dropped."""
  out, unused = {}, []
  for name, x in weights.items():
    *path, leaf = name.split(".")
    if leaf in BUFFERS:
      continue
    if path and path[0] == prefix:
      path = path[1:]
    for flax_leaf in LEAVES.get(leaf, (leaf,)):
      key = ("batch_stats" if flax_leaf in ("mean", "var") else "params", *path, flax_leaf)
      if key in expected:
        out[key] = _to_flax(np.asarray(x), flax_leaf)
        break
    else:
      unused.append("/".join(name.split(".")))
  return out, unused


def _from_flax(weights: dict, expected, prefix: str | None) -> tuple[dict, list[str]]:
  """from_torch's result for a Flax msgpack file ('/'-joined variable paths, 'params' / 'batch_stats' first
  where the model has statistics)."""
  out, unused = {}, []
  for name, x in weights.items():
    path = name.split("/")
    if path[0] not in ("params", "batch_stats"):
      path = ["params", *path]
    if len(path) > 1 and path[1] == prefix:
      path = [path[0], *path[2:]]
    if tuple(path) in expected:
      out[tuple(path)] = x
    else:
      unused.append(name)
  return out, unused


def to_torch(variables: dict) -> dict:
  """from_torch's inverse: {PyTorch name: contiguous float32 array} of a module's variables."""
  out = {}
  for (_, *path, leaf), x in traverse_util.flatten_dict(jax.device_get(variables)).items():
    x = np.asarray(x, np.float32)
    if leaf == "kernel":
      x = x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1) if x.ndim == 4 else x
    out[".".join([*path, TORCH_LEAF.get(leaf, leaf)])] = np.ascontiguousarray(x)
    if leaf == "mean":  # PyTorch's BatchNorm counts its updates (a buffer jaxft does not keep)
      out[".".join([*path, "num_batches_tracked"])] = np.zeros((), np.int64)
  return out


def variables(path: Path, init: Callable, seed: int, weights: str = "pretrained", prefix: str | None = None
              ) -> tuple[dict, str]:
  """(the module's variables {'params'[, 'batch_stats']}, a one-line report) from checkpoint `path`.
  init(rng) -> variables is the module's own initialisation: variables the checkpoint lacks keep it and are
  named in the report. weights (model.weights): random: none are read; shapes: no file is read, the
  variables are ShapeDtypeStructs."""
  rng = jax.random.PRNGKey(seed)
  shapes = jax.eval_shape(init, rng)
  if weights == "shapes":
    return dict(shapes), "model.weights=shapes: the architecture only, no weights read"
  if weights == "random":
    return dict(jax.jit(init)(rng)), "model.weights=random: every param newly initialised"
  file = formats.find(path)
  read, kind = formats.read(file)
  expected = traverse_util.flatten_dict(dict(shapes))
  loaded, unused = (from_torch if kind == "pytorch" else _from_flax)(read, expected, prefix)
  for k, x in loaded.items():
    if tuple(x.shape) != tuple(expected[k].shape):
      raise JaxftError(f"{file}: '{'/'.join(k[1:])}' has shape {tuple(x.shape)}, the model expects "
                       f"{tuple(expected[k].shape)}")
  new = [k for k in expected if k not in loaded]
  fresh = traverse_util.flatten_dict(dict(jax.jit(init)(rng))) if new else {}
  out = traverse_util.unflatten_dict({k: jnp.asarray(loaded[k], expected[k].dtype) if k in loaded else fresh[k]
                                      for k in expected})
  return out, (f"{file.name} ({kind} names); unused checkpoint keys: {fold(unused) or 'none'}; not in the "
               f"checkpoint, newly initialised: {fold(['/'.join(k[1:]) for k in new]) or 'none'}")


def save(out_dir: Path, config, variables: dict, tokenizer=None, source: Path | None = None) -> None:
  """A directory transformers (PyTorch) and jaxft load: config.json, model.safetensors in PyTorch names (the
  BatchNorm statistics in `variables` too), the tokenizer, and `source`'s image preprocessing config."""
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config.save_pretrained(out)
  save_file(to_torch(variables), str(out / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(out)
  if source is not None and (source / "preprocessor_config.json").is_file():
    shutil.copy(source / "preprocessor_config.json", out / "preprocessor_config.json")
