"""Hugging Face checkpoint directories: config, tokenizer, and weights mapped onto a Flax param tree.

The weights are read by jaxft.formats (Flax msgpack, safetensors, PyTorch pickles: never torch) and
PyTorch names are converted with transformers' public converter; which checkpoint keys went unused
and which params are new is computed here, by comparing key sets, not by reading library logs.
"""
import dataclasses
import shutil
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from jaxft import assets, formats
from jaxft.errors import JaxftError
from jaxft.models.base import Opened, max_positions


@dataclasses.dataclass
class Checkpoint:
  path: Path
  config: Any
  model: Any  # transformers' Flax base model of the family (loads, converts and saves)
  params: Any  # the base model's params, loaded
  tokenizer: Any
  report: str  # one line: format, unused checkpoint keys, newly initialised params


def read_config(path: Path):
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
  """A Hugging Face directory described for `family` (bert, or transformers' Flax class): its config, the
  length its position embeddings cover, and its pooling."""
  config = config_of(found)
  return Opened(found.path, family, config.model_type, config, max_positions(config), pooling(found.path))


def pooling(path: Path) -> str:
  """'mean' for sentence-transformers checkpoints trained with mean pooling, else 'cls'."""
  pooling_cfg = path / "1_Pooling" / "config.json"
  if pooling_cfg.is_file() and assets.json_object(pooling_cfg).get("pooling_mode_mean_tokens"):
    return "mean"
  return "cls"


def fold(keys: list[str]) -> str:
  """'classifier/bias', 'classifier/kernel' -> 'classifier/{bias,kernel}'."""
  groups: dict[str, list[str]] = {}
  for k in sorted(keys):
    head, _, leaf = k.rpartition("/")
    groups.setdefault(head, []).append(leaf)
  return ", ".join(f"{h}/{{{','.join(v)}}}" if len(v) > 1 else f"{h}/{v[0]}" if h else v[0]
                   for h, v in groups.items())


def _base_model(config, pooler: bool, seed: int, dtype: str):
  """transformers' Flax base model for `config` (without the pooler where the class allows leaving it out),
  holding its param shapes only (`params_shape_tree`): `_initialised` makes random params."""
  import transformers
  from transformers.utils import logging as hf_logging
  hf_logging.set_verbosity_error()  # its deprecation notice for Flax classes, once per process
  kwargs = dict(seed=seed, dtype=jnp.dtype(dtype), _do_init=False)
  try:
    return transformers.FlaxAutoModel.from_config(config, add_pooling_layer=pooler, **kwargs)
  except TypeError:  # the class has no optional pooler
    return transformers.FlaxAutoModel.from_config(config, **kwargs)
  except ValueError as e:
    raise JaxftError(f"no Flax model class for {config.model_type!r} models in transformers: "
                     f"{str(e).splitlines()[0]}") from None


def _initialised(model) -> dict:
  """The model's own random initialisation (transformers' init_weights with its seed), compiled as one
  program: run op by op it took seconds even for a tiny model."""
  return unfreeze(jax.jit(model.init_weights, static_argnums=1)(model.key, model.input_shape))


def _checkpoint_keys(weights: dict, kind: str, model) -> dict:
  """{param path tuple: array} of the checkpoint, in the base model's naming."""
  shapes, prefix = model.params_shape_tree, model.base_model_prefix
  if kind == "pytorch":  # the converter reads only the names and shapes of the model's params
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
    described = types.SimpleNamespace(params=shapes, base_model_prefix=prefix)
    return traverse_util.flatten_dict(convert_pytorch_state_dict_to_flax(weights, described))
  flat = {tuple(k.split("/")): v for k, v in weights.items()}
  # a model with a head -> its base; with BatchNorm the trees are {params, batch_stats} -> {prefix: ...}
  at = 1 if "batch_stats" in shapes else 0
  if prefix not in shapes.get("params", shapes) and any(len(k) > at and k[at] == prefix for k in flat):
    flat = {(k[:at] + k[at + 1:] if len(k) > at and k[at] == prefix else k): v for k, v in flat.items()}
  return flat


def load(path: Path, config, pooler: bool, seed: int = 0, dtype: str = "float32", weights: str = "pretrained",
         tokenizer_path: Path | None = None) -> Checkpoint:
  """The base model's params from the checkpoint in `path`; params the checkpoint lacks keep the
  model's own initialisation and are named in the report. weights (model.weights): random: none are taken
  from the checkpoint; shapes: no weights at all, the params are ShapeDtypeStructs (no file is read).
  tokenizer_path: where the tokenizer is (default `path`)."""
  import transformers
  tokenizer_path = tokenizer_path or path
  model = _base_model(config, pooler, seed, dtype)
  if weights == "shapes":
    params, report = model.params_shape_tree, "model.weights=shapes: the architecture only, no weights read"
  elif weights == "random":  # the config's network, freshly initialised: no weights file needed
    params, report = _initialised(model), "model.weights=random: every param newly initialised"
  else:
    params, report = _weights(path, model)
  try:  # an image model has none (models/hf_flax.py reads its preprocessor_config.json)
    tokenizer = (None if model.main_input_name == "pixel_values" else
                 transformers.AutoTokenizer.from_pretrained(tokenizer_path))
  except (OSError, ValueError, KeyError) as e:
    where = f" from {tokenizer_path}" if tokenizer_path != path else " (model.tokenizer can name another)"
    raise JaxftError(f"could not load the tokenizer of {path}{where}: {str(e).splitlines()[0]}") from None
  return Checkpoint(path, config, model, params, tokenizer, report)


def _weights(path: Path, model):
  """(params, one-line report) of the checkpoint file in `path` on `model`'s param tree."""
  file = formats.find(path)
  weights, kind = formats.read(file)
  try:
    loaded = _checkpoint_keys(weights, kind, model)
  except ValueError as e:
    raise JaxftError(f"{file}: {str(e).splitlines()[0]}") from None
  expected = traverse_util.flatten_dict(model.params_shape_tree)
  for k, x in loaded.items():
    if k in expected and tuple(x.shape) != tuple(expected[k].shape):
      raise JaxftError(f"{file}: '{'/'.join(k)}' has shape {tuple(x.shape)}, the model expects "
                       f"{tuple(expected[k].shape)}")
  unused = ["/".join(k) for k in loaded if k not in expected]
  new = ["/".join(k) for k in expected if k not in loaded]
  initialised = traverse_util.flatten_dict(_initialised(model)) if new else {}
  params = traverse_util.unflatten_dict({k: jnp.asarray(loaded[k]) if k in loaded else initialised[k]
                                         for k in expected})
  return params, (f"{file.name} ({kind} names); unused checkpoint keys: {fold(unused) or 'none'}; not in the "
                  f"checkpoint, newly initialised: {fold(new) or 'none'}")


def save(ckpt: Checkpoint, params, out_dir: Path, state=None) -> None:
  """A directory transformers (and jaxft) load back: config, flax_model.msgpack (with the BatchNorm
  statistics in `state`, if any), the tokenizer or the image preprocessing config."""
  ckpt.model.save_pretrained(out_dir, params={"params": params, **state} if state else params)
  if ckpt.tokenizer is not None:
    ckpt.tokenizer.save_pretrained(out_dir)
  if (ckpt.path / "preprocessor_config.json").is_file():
    shutil.copy(ckpt.path / "preprocessor_config.json", Path(out_dir) / "preprocessor_config.json")
