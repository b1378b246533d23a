"""Training phases: each has its own freeze rules, optimizer and LR schedule, and an end.

A run is a list of phases over one data stream and one step counter (no `phases`: one phase of
train.epochs). At a phase switch the new optimizer is initialised, and every per-param optimizer
leaf (e.g. Adam's mu / nu) of a param trainable in both phases carries over; step counts restart
with the new schedule. Checkpoints record the phase, its start step and the plateau counter.
"""
import dataclasses
import re
from typing import Any

import jax

from jaxft import optim, rules
from jaxft.config import phase_config
from jaxft.data import pipeline
from jaxft.errors import JaxftError


@dataclasses.dataclass
class Phase:
  name: str
  cfg: Any  # the run's config with this phase's overrides
  labels: Any  # 'train' / 'frozen' per param
  tx: Any
  lr: Any  # the peak LR schedule over the phase's own steps
  max_steps: int
  until: dict | None  # {metric, patience}: end early when validation stops improving


def preset(name: str, cfg, params, can_cache: bool) -> list[dict]:
  if name == "lp_ft":  # Kumar et al. 2022: linear probe to convergence, then fine-tune gently
    return [{"name": "linear_probe", "train_only": [rules.HEAD_RE],
             "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0},
             "train": {"cache_features": can_cache},
             "until": {"metric": "val_loss", "patience": 2, "max_epochs": 10}},
            {"name": "fine_tune", "optim": {"lr": cfg.optim.lr / 2}, "epochs": cfg.train.epochs}]
  n = rules.num_layers(params)  # gradual_unfreeze (ULMFiT): one more layer from the top each epoch
  return [{"name": f"top_{i}_layers", "freeze_bottom_layers": n - i, "epochs": 1} for i in range(n + 1)]


def build(cfg, params, n_train: int, can_cache: bool) -> list[Phase]:
  specs = cfg.phases or (preset(cfg.phases_preset, cfg, params, can_cache) if cfg.phases_preset else
                         [{"name": "train", "epochs": cfg.train.epochs}])
  phases = []
  for i, spec in enumerate(specs):
    pcfg, end = phase_config(cfg, i, spec)
    until = end.get("until")
    epochs = until.get("max_epochs", cfg.train.epochs) if until else end.get("epochs")
    steps = end.get("steps") or pipeline.steps_for(n_train, cfg.train.batch_size, epochs)
    labels = rules.freeze_labels(pcfg, params)
    tx, lr = optim.make_optimizer(pcfg.optim, params, labels, steps, cfg.train.batch_size)
    phases.append(Phase(spec.get("name", f"phase_{i}"), pcfg, labels, tx, lr, int(steps),
                        {"patience": 1, **until} if until else None))
  return phases


def ended(phase: Phase, meta: dict, step: int) -> bool:
  if step - meta["phase_start"] >= phase.max_steps:
    return True
  return bool(phase.until and meta["plateau"] and meta["plateau"]["bad"] >= phase.until["patience"])


def update_plateau(phase: Phase, meta: dict, val: dict) -> None:
  """Counts evaluations without improvement of the phase's `until` metric."""
  if not phase.until:
    return
  key = phase.until["metric"][len("val_"):]
  value, p = val[key], meta["plateau"]
  better = p is None or (value < p["best"] if key == "loss" else value > p["best"])
  meta["plateau"] = {"best": value, "bad": 0} if better else {"best": p["best"], "bad": p["bad"] + 1}


def carry_over(state, tx):
  """The state with `tx`'s fresh optimizer state, keeping every per-param leaf (same param, same
  role, same shape) of the previous optimizer state."""
  param_paths = rules.flat(state.params)

  def key(keypath):
    path = rules.owner(keypath, param_paths)
    role = tuple(str(k) for k in keypath if not isinstance(k, jax.tree_util.DictKey))
    return (path, role) if path else None

  old = {k: x for kp, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if (k := key(kp))}

  def take(keypath, new):
    prev = old.get(key(keypath))
    return prev if prev is not None and prev.shape == new.shape and prev.dtype == new.dtype else new

  opt_state = jax.tree_util.tree_map_with_path(take, tx.init(state.params))
  return state.replace(opt_state=opt_state)


def check_cacheable(phase: Phase, model) -> None:
  """train.cache_features needs a model with a separable head and nothing else trainable."""
  if not phase.cfg.train.cache_features:
    return
  if model.features is None:
    raise JaxftError(f"phase '{phase.name}': train.cache_features needs a mean-pooled head "
                     f"(model.pooling=mean); {model.name} uses its own head")
  other = [p for p, l in rules.flat(phase.labels).items() if l == "train" and not re.fullmatch(rules.HEAD_RE, p)]
  if other:
    raise JaxftError(f"phase '{phase.name}': train.cache_features trains the head only, but {other[0]} "
                     f"is trainable too (freeze it, e.g. train_only=[{rules.HEAD_RE}])")
