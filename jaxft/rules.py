"""Ordered (regex, value) rules over '/'-joined param paths: the one per-parameter mechanism.

Freezing, weight-decay masks, LR groups, LoRA targets and sharding are all rule lists: the first
rule whose regex fully matches a path gives that param its value, and a rule that matches no path
at all is an error (it is almost always a typo). Family regexes (embeddings, layers) come from the
model provider's Conventions (jaxft/models/), the head's from the task.
"""
import re
from collections.abc import Sequence
from typing import Any

import jax
from flax import traverse_util

from jaxft.errors import JaxftError

Rules = Sequence[tuple[str, Any]]
ADAPTER_RE = r".*/lora_[ab]"


def flat(tree) -> dict:
  """{'/'-joined key path: leaf} of a nested-dict pytree."""
  return traverse_util.flatten_dict(tree, sep="/")


def paths(tree) -> list[str]:
  return list(flat(tree))


def apply_rules(tree, rules: Rules, default: Any = None, what: str = "rule", strict: bool = True):
  """A tree shaped like `tree` holding, per leaf, the value of the first rule matching its path.

  strict: a rule that matches no path is an error naming it and a few real paths.
  """
  leaves = flat(tree)
  compiled = [(compile_rule(r, what), v, r) for r, v in rules]
  used = [False] * len(compiled)
  out = {}
  for path in leaves:
    out[path] = default
    for i, (rx, value, _) in enumerate(compiled):
      if rx.fullmatch(path):
        out[path], used[i] = value, True
        break
  for (_, _, pattern), u in zip(compiled, used):
    if strict and not u:
      sample = ", ".join(list(leaves)[:: max(1, len(leaves) // 5)][:5])
      raise JaxftError(f"{what} '{pattern}' matches no parameter path (paths look like: {sample})")
  return traverse_util.unflatten_dict(out, sep="/")


def layer_index(path: str, conv) -> int | None:
  """The transformer block a param belongs to, by the family's `layers` convention."""
  m = re.match(conv.layers + r"(\d+)/", path)
  return int(m.group(1)) if m else None


def compile_rule(pattern: str, what: str = "rule") -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise JaxftError(f"{what} '{pattern}' is not a valid regex: {e}") from None


def num_layers(tree, conv) -> int:
  idx = [i for p in paths(tree) if (i := layer_index(p, conv)) is not None]
  return max(idx) + 1 if idx else 0


def freeze_rules(cfg, params, conv, head_re: str) -> list[tuple[str, str]]:
  """Compiles `freeze`, `train_only`, `freeze_embeddings`, `freeze_bottom_layers` to label rules, with
  the family's conventions `conv`. With LoRA only the adapters and the head (`head_re`; None: the task
  adds none) train (plus anything in `train_only`)."""
  rules = [(r, "frozen") for r in cfg.freeze]
  if cfg.freeze_embeddings and conv.embeddings is None:
    raise JaxftError("freeze_embeddings=true, but this model family has no embedding table (leave it unset)")
  default = conv.embeddings is not None and (conv.embeddings_frozen == "always" or (
      conv.embeddings_frozen == "with_bottom_layers" and cfg.freeze_bottom_layers > 0))
  if cfg.freeze_embeddings or (cfg.freeze_embeddings is None and default):
    rules.append((conv.embeddings, "frozen"))
  if cfg.freeze_bottom_layers:
    n = num_layers(params, conv)
    if cfg.freeze_bottom_layers > n:
      raise JaxftError(f"freeze_bottom_layers={cfg.freeze_bottom_layers} but the model has {n} layers")
    layers = "|".join(str(i) for i in range(cfg.freeze_bottom_layers))
    rules.append((rf"{conv.layers}({layers})/.*", "frozen"))
  train_only = list(cfg.train_only) + ([ADAPTER_RE] + [head_re] * bool(head_re) if lora_enabled(cfg.lora) else [])
  if train_only:
    rules += [(r, "train") for r in train_only] + [(".*", "frozen")]
  return rules


def lora_enabled(lcfg) -> bool:
  return bool(lcfg.targets or lcfg.preset)


def freeze_labels(cfg, params, conv, head_re: str):
  """The label tree ('train' / 'frozen' per leaf) that optax.multi_transform consumes."""
  return apply_rules(params, freeze_rules(cfg, params, conv, head_re), default="train", what="freeze rule")


def weight_decay_mask(params, conv):
  """True where weight decay applies: not on biases and normalisation scales."""
  return apply_rules(params, [(r, False) for r in conv.no_decay], default=True, strict=False)


def split(tree, labels, label: str):
  """(leaves whose label == label, all others) as two flat {path: leaf} dicts."""
  leaves, flat_labels = flat(tree), flat(labels)
  sel = {p: v for p, v in leaves.items() if flat_labels[p] == label}
  rest = {p: v for p, v in leaves.items() if flat_labels[p] != label}
  return sel, rest


def trained(labels) -> frozenset:
  """The param paths a label tree trains."""
  return frozenset(p for p, label in flat(labels).items() if label == "train")


def merge(*flat_dicts):
  """Inverse of `split`: one nested tree from flat {path: leaf} dicts."""
  out = {}
  for d in flat_dicts:
    out.update(d)
  return traverse_util.unflatten_dict(out, sep="/")


def owner(keypath, param_paths) -> str | None:
  """The param path an optimizer-state leaf belongs to (its dict keys end with it), or None."""
  keys = [str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey)]
  for start in range(len(keys)):
    if (path := "/".join(keys[start:])) in param_paths:
      return path
  return None


def module_named(modules, module_path: tuple) -> str | None:
  """Which of `modules` (param paths of flax modules, the params' root prefix included) a module called at
  `module_path` (flax's `module.path`, relative to the applied module: no root prefix) is; None: none."""
  name = "/".join(module_path)
  return next((m for m in modules if m == name or m.endswith("/" + name)), None)


def count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
