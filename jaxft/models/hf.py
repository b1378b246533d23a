"""Hugging Face checkpoints, loaded and saved by transformers' Flax classes (transformers 4.x).

A checkpoint directory holds config.json, the weights (flax_model.msgpack, or PyTorch-style
model.safetensors / pytorch_model.bin, converted without torch) and the tokenizer files. BERT-family
models compute with jaxft's own encoder (models/bert.py, same params); others with transformers' module.
"""
import ast
import contextlib
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from jaxft.errors import JaxftError
from jaxft.models import bert

HEAD_FILE = "classifier.msgpack"  # the mean-pooled head, beside an exported encoder


@dataclasses.dataclass
class Model:
  """A loaded model: `apply(params, batch, train, rng)` returns logits (classification) or the
  last hidden states (embedding)."""
  name: str
  params: Any
  apply: Callable
  tokenizer: Any
  config: Any
  save: Callable  # save(params, out_dir): a checkpoint dir that `load` (and transformers) read back
  # Mean-pooled heads split into a frozen-backbone part and the head (for train.cache_features):
  # apply(params, batch) == head(params, features(params, batch)) in eval mode.
  features: Callable | None = None  # (params, batch) -> pooled_BxD
  head: Callable | None = None  # (params, pooled_BxD, train, rng) -> logits_BxC


class _Capture(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_transformers_warnings():
  """Holds back transformers' multi-line load warnings so we can print one line of our own."""
  from transformers.utils import logging as hf_logging
  hf_logging.disable_default_handler()
  cap = _Capture()
  root = hf_logging.get_logger()
  root.addHandler(cap)
  try:
    yield cap.messages
  finally:
    root.removeHandler(cap)
    hf_logging.enable_default_handler()


def _key_set(messages, pattern) -> list[str]:
  for m in messages:
    if (found := re.search(pattern, m, re.S)):
      try:
        return sorted("/".join(k) for k in ast.literal_eval(found.group(1)))
      except (ValueError, SyntaxError):
        return [found.group(1)]
  return []


def _fold(keys: list[str]) -> str:
  """'classifier/bias', 'classifier/kernel' -> 'classifier/{bias,kernel}'."""
  groups: dict[str, list[str]] = {}
  for k in keys:
    head, _, leaf = k.rpartition("/")
    groups.setdefault(head, []).append(leaf)
  return ", ".join(f"{h}/{{{','.join(v)}}}" if len(v) > 1 else f"{h}/{v[0]}" if h else v[0]
                   for h, v in groups.items())


def checkpoint_pooling(path: Path) -> str:
  """'mean' for sentence-transformers checkpoints trained with mean pooling, else 'head'."""
  pooling = path / "1_Pooling" / "config.json"
  if pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"):
    return "mean"
  return "head"


def _from_pretrained(cls, path, has_flax, **kwargs):
  try:
    return cls.from_pretrained(path, from_pt=not has_flax, **kwargs)
  except (OSError, ValueError, KeyError) as e:
    raise JaxftError(f"could not load {path}: {str(e).splitlines()[0]}") from None


def _transformers_encode(model, compute_dtype: str, remat: str):
  """encode(params, batch, train, rng) -> (last hidden states, logits or None) through transformers'
  module, with the computation dtype and per-block rematerialisation set on it."""
  fields = {f.name for f in dataclasses.fields(model.module)}
  changes = {"dtype": jnp.dtype(compute_dtype)}
  if remat == "block":
    if "gradient_checkpointing" not in fields:
      raise JaxftError(f"model.remat=block: {type(model).__name__} has no gradient checkpointing")
    changes["gradient_checkpointing"] = True
  model._module = model.module.clone(**changes)

  def encode(params, batch, train, rng):
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), params=params,
                dropout_rng=rng, train=train)
    return getattr(out, "last_hidden_state", None), getattr(out, "logits", None)
  return encode


def _jaxft_encode(model, compute_dtype: str, remat: str, classifier: bool):
  """The same contract through jaxft's BERT encoder, on transformers' param tree."""
  kwargs = dict(dtype=jnp.dtype(compute_dtype), remat=remat == "block")
  if classifier:
    module = bert.BertForSequenceClassification(model.config, **kwargs)
  else:
    module = bert.BertModel(model.config, add_pooling_layer="pooler" in model.params, **kwargs)

  def encode(params, batch, train, rng):
    out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch.get("token_type_ids"), train, rngs={"dropout": rng} if train else {})
    return (None, out) if classifier else (out[0], None)
  return encode


def load(path: Path, task: str, num_labels: int | None = None, pooling: str = "auto", seed: int = 0,
         log=print, compute_dtype: str = "float32", remat: str = "none", impl: str = "auto") -> Model:
  """Loads the checkpoint in `path` for `task`.

  classification + pooling 'head': transformers' *ForSequenceClassification class (its own head,
  newly initialised if the checkpoint has none). pooling 'mean': the base model, masked mean over
  tokens, dropout, a new Dense head at `classifier/` ('auto' picks 'mean' for sentence-transformers
  checkpoints, which were trained to be mean-pooled).
  impl: 'jaxft' computes with jaxft's BERT encoder, 'transformers' with the class's own module,
  'auto' with jaxft's wherever it supports the config.
  """
  import transformers
  path = Path(path)
  if not (path / "config.json").is_file():
    raise JaxftError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
  has_flax = (path / "flax_model.msgpack").is_file()
  has_pt = any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin",
                                                "model.safetensors.index.json"))
  if not (has_flax or has_pt):
    raise JaxftError(f"no weights in {path}: expected flax_model.msgpack or model.safetensors")
  if pooling == "auto":
    pooling = checkpoint_pooling(path)
  mean_head = task == "classification" and pooling == "mean"
  with _captured_transformers_warnings() as messages:
    if task == "classification" and not mean_head:
      kwargs = {"num_labels": num_labels} if num_labels else {}
      model = _from_pretrained(transformers.FlaxAutoModelForSequenceClassification, path, has_flax,
                               seed=seed, **kwargs)
    else:
      try:  # a mean-pooled head does not use the pooler: leave it out where the class allows
        model = _from_pretrained(transformers.FlaxAutoModel, path, has_flax, seed=seed,
                                 add_pooling_layer=not mean_head)
      except TypeError:
        model = _from_pretrained(transformers.FlaxAutoModel, path, has_flax, seed=seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  native = impl != "transformers" and bert.supports(model.config)
  if impl == "jaxft" and not native:
    raise JaxftError(f"model.impl=jaxft: no jaxft encoder for {model.config.model_type!r} models "
                     f"({type(model).__name__}); use model.impl=transformers")
  if native:
    encode = _jaxft_encode(model, compute_dtype, remat, task == "classification" and not mean_head)
  else:
    encode = _transformers_encode(model, compute_dtype, remat)
  unused = _key_set(messages, r"were not used when initializing \w+: (\{.*?\})\n")
  new = _key_set(messages, r"newly initialized: (\{.*?\})\n")
  params = model.params
  prefix = model.base_model_prefix
  if mean_head:
    cfg = model.config
    if (path / HEAD_FILE).is_file():  # written by `jaxft export`
      head = flax.serialization.msgpack_restore((path / HEAD_FILE).read_bytes())
    else:
      kernel = cfg.initializer_range * jax.random.normal(jax.random.PRNGKey(seed), (cfg.hidden_size, num_labels))
      head = {"kernel": kernel, "bias": jnp.zeros((num_labels,))}
      new += ["classifier/bias", "classifier/kernel"]
    if head["kernel"].shape != (cfg.hidden_size, num_labels):
      raise JaxftError(f"{path / HEAD_FILE}: head kernel {head['kernel'].shape} does not fit "
                       f"{num_labels} labels of hidden size {cfg.hidden_size}")
    params = {prefix: params, "classifier": head}
  log(f"loaded {type(model).__name__} from {path} ({'flax msgpack' if has_flax else 'pytorch weights'}, "
      f"{'jaxft encoder' if native else 'transformers module'}"
      f"{', mean-pooled head' if mean_head else ''}); unused checkpoint keys: {_fold(unused) or 'none'}; "
      f"newly initialised: {_fold(new) or 'none'}")

  features = head = None
  if mean_head:
    rate = getattr(model.config, "classifier_dropout", None) or model.config.hidden_dropout_prob

    def pool(params, batch, train, rng):
      h_BxLxD = encode(params[prefix], batch, train, rng)[0].astype(jnp.float32)
      m_BxLx1 = batch["attention_mask"][..., None].astype(h_BxLxD.dtype)
      return (h_BxLxD * m_BxLx1).sum(1) / jnp.maximum(m_BxLx1.sum(1), 1.0)

    def features(params, batch):
      return pool(params, batch, False, None)

    def head(params, pooled_BxD, train=False, rng=None):
      if train and rate > 0:
        keep_BxD = jax.random.bernoulli(rng, 1.0 - rate, pooled_BxD.shape)
        pooled_BxD = jnp.where(keep_BxD, pooled_BxD / (1.0 - rate), 0.0)
      w = params["classifier"]
      return pooled_BxD @ w["kernel"].astype(jnp.float32) + w["bias"].astype(jnp.float32)

    def apply(params, batch, train=False, rng=None):
      rng_enc, rng_head = jax.random.split(rng) if rng is not None else (None, None)
      return head(params, pool(params, batch, train, rng_enc), train, rng_head)
  elif task == "classification":
    def apply(params, batch, train=False, rng=None):
      return encode(params, batch, train, rng)[1]
  else:
    def apply(params, batch, train=False, rng=None):
      return encode(params, batch, train, rng)[0]

  def save(params, out_dir):
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, params=params[prefix] if mean_head else params)
    tokenizer.save_pretrained(out_dir)
    if mean_head:
      (out_dir / HEAD_FILE).write_bytes(flax.serialization.msgpack_serialize(jax.device_get(params["classifier"])))
      (out_dir / "1_Pooling").mkdir(exist_ok=True)
      (out_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))

  return Model(name=str(path), params=params, apply=apply, tokenizer=tokenizer, config=model.config, save=save,
               features=features, head=head)
