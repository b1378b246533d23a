"""Hugging Face checkpoints through transformers' Flax classes (transformers 4.x).

A checkpoint directory holds config.json, the weights (flax_model.msgpack, or PyTorch-style
model.safetensors / pytorch_model.bin, converted without torch) and the tokenizer files.
"""
import ast
import contextlib
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Callable

from jaxft.errors import JaxftError

TASKS = {"classification": "FlaxAutoModelForSequenceClassification", "embedding": "FlaxAutoModel"}


@dataclasses.dataclass
class Model:
  """A loaded model: `apply(params, batch, train, rng)` returns logits (classification) or the
  last hidden states (embedding)."""
  name: str
  params: Any
  apply: Callable
  tokenizer: Any
  config: Any


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


def load(path: Path, task: str, num_labels: int | None = None, seed: int = 0, log=print) -> Model:
  """Loads the checkpoint in `path` for `task`, with a freshly initialised head if it has none."""
  import transformers
  path = Path(path)
  if not (path / "config.json").is_file():
    raise JaxftError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
  has_flax = (path / "flax_model.msgpack").is_file()
  has_pt = any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin",
                                                "model.safetensors.index.json"))
  if not (has_flax or has_pt):
    raise JaxftError(f"no weights in {path}: expected flax_model.msgpack or model.safetensors")
  kwargs = {"num_labels": num_labels} if task == "classification" and num_labels else {}
  auto_cls = getattr(transformers, TASKS[task])
  with _captured_transformers_warnings() as messages:
    try:
      model = auto_cls.from_pretrained(path, from_pt=not has_flax, seed=seed, **kwargs)
    except (OSError, ValueError, KeyError) as e:
      raise JaxftError(f"could not load {path}: {str(e).splitlines()[0]}") from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  unused = _key_set(messages, r"were not used when initializing \w+: (\{.*?\})\n")
  new = _key_set(messages, r"newly initialized: (\{.*?\})\n")
  log(f"loaded {type(model).__name__} from {path} ({'flax msgpack' if has_flax else 'pytorch weights'}); "
      f"unused checkpoint keys: {_fold(unused) or 'none'}; newly initialised: {_fold(new) or 'none'}")

  if task == "classification":
    def apply(params, batch, train=False, rng=None):
      return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                   params=params, dropout_rng=rng, train=train).logits
  else:
    def apply(params, batch, train=False, rng=None):
      return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                   params=params, dropout_rng=rng, train=train).last_hidden_state
  return Model(name=str(path), params=model.params, apply=apply, tokenizer=tokenizer, config=model.config)
