"""Training phases: each has its own freeze rules, optimizer and LR schedule, and an end.

A run is a list of phases over one data stream and one step counter (no `phases`: one phase of
train.epochs). At a phase switch the new optimizer is initialised, and every per-param optimizer
leaf (e.g. Adam's mu / nu) of a param trainable in both phases carries over; step counts restart
with the new schedule. Checkpoints record the phase, its start step and the plateau counter (RunRecord).
"""
import dataclasses
import functools
import math
import re
from typing import Any

import jax

from jaxft import optim, rules
from jaxft.checkpoint import RunRecord
from jaxft.config import phase_config
from jaxft.data import batching
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
  grown: Any = None  # train.batch_schedule: k -> (tx, lr) of batches of k x train.batch_size (k = 1: tx, lr)


PRESETS = ("lp_ft", "gradual_unfreeze")  # phases_preset


def preset(name: str, cfg, params, task, conv) -> list[dict]:
  if name not in PRESETS:
    raise JaxftError(f"config key 'phases_preset' must be one of {', '.join(PRESETS)}, got {name!r}")
  if name == "lp_ft":  # Kumar et al. 2022: linear probe to convergence, then fine-tune gently
    if task.head_regex is None:
      raise JaxftError(f"phases_preset=lp_ft: {cfg.task.name} adds no head to probe")
    return [{"name": "linear_probe", "train_only": [task.head_regex],
             "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0},
             "train": {"cache_features": task.cacheable, "eval_every": 100},  # cached: cheap plateau checks
             "until": {"metric": "val_loss", "patience": 2, "max_epochs": 10}},
            {"name": "fine_tune", "optim": {"lr": cfg.optim.lr / 2}, "epochs": cfg.train.epochs}]
  n = rules.num_layers(params, conv)  # gradual_unfreeze (ULMFiT): one more layer from the top each epoch
  return [{"name": f"top_{i}_layers", "freeze_bottom_layers": n - i, "epochs": 1} for i in range(n + 1)]


def build(cfg, params, n_train: int, task, conv) -> list[Phase]:
  """The run's phases for a task (its head regex, metrics) and a model family's conventions `conv`."""
  specs = cfg.phases or (preset(cfg.phases_preset, cfg, params, task, conv) if cfg.phases_preset else
                         [{"name": "train", "epochs": cfg.train.epochs}])
  ends = [phase_config(cfg, i, spec) for i, spec in enumerate(specs)]
  steps = []
  for i, (_, end) in enumerate(ends):
    until = end.get("until")
    if until and until["metric"][len("val_"):] not in task.metrics:
      raise JaxftError(f"config key 'phases[{i}].until.metric' is {until['metric']}; this task reports "
                       f"{', '.join('val_' + m for m in task.metrics)}")
    epochs = until.get("max_epochs", cfg.train.epochs) if until else end.get("epochs")
    steps.append(end.get("steps") or batching.steps_for(n_train, cfg.train.batch_size, epochs))
  # train.min_steps: the epoch-counted phases together train at least that many steps, each lengthened alike
  counted = sum(s for s, (_, end) in zip(steps, ends) if "epochs" in end)
  if 0 < counted < cfg.train.min_steps:
    steps = [math.ceil(s * cfg.train.min_steps / counted) if "epochs" in end else s for s, (_, end) in zip(steps, ends)]
  phases, swept = [], tuple(optim.hparams_of(cfg.train.sweep or {}))  # the optim keys train.sweep varies
  for i, (spec, (pcfg, end), n_steps) in enumerate(zip(specs, ends, steps)):
    until = end.get("until")
    labels = rules.freeze_labels(pcfg, params, conv, task.head_regex)
    if "train" not in rules.flat(labels).values():
      where = f"phase '{spec.get('name', f'phase_{i}')}'" if len(specs) > 1 else "the run"
      raise JaxftError(f"{where} trains nothing: the freeze rules (freeze, train_only, freeze_embeddings, "
                       f"freeze_bottom_layers) freeze every parameter")
    make = functools.partial(optim.make_optimizer, pcfg.optim, params, labels, n_steps, cfg.train.batch_size, conv,
                             swept)
    grown = (lambda k, make=make: make(units=k)) if cfg.train.batch_schedule else None
    tx, lr = grown(1) if grown else make()
    phases.append(Phase(spec.get("name", f"phase_{i}"), pcfg, labels, tx, lr, int(n_steps),
                        {"patience": 1, **until} if until else None, grown))
  return phases


def ended(phase: Phase, record: RunRecord, step: int) -> bool:
  if step - record.phase_start >= phase.max_steps:
    return True
  return bool(phase.until and record.plateau_best is not None and record.plateau_bad >= phase.until["patience"])


def update_plateau(phase: Phase, record: RunRecord, val: dict, lower_is_better) -> None:
  """Counts evaluations without improvement of the phase's `until` metric."""
  if not phase.until:
    return
  key = phase.until["metric"][len("val_"):]
  value, best = val[key], record.plateau_best
  if best is None or (value < best if key in lower_is_better else value > best):
    record.plateau_best, record.plateau_bad = value, 0
  else:
    record.plateau_bad += 1


def carry_over(state, tx):
  """The state with `tx`'s fresh optimizer state, keeping every per-param leaf (same param, same
  role, same shape) of the previous optimizer state. The step hooks' state starts over (the gradient noise
  scale is of the phase's trainable params)."""
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
  return state.replace(opt_state=opt_state, hooks=jax.tree.map(jax.numpy.zeros_like, state.hooks))


def check_cacheable(phase: Phase, task, replicas_before=()) -> None:
  """train.cache_features needs a task whose head reads cacheable features, and nothing else trainable;
  in a seed-vectorised run (`replicas_before`: its earlier phases), replicas whose backbones are still
  the pretrained one (their features one table)."""
  if not phase.cfg.train.cache_features:
    return
  for before in replicas_before:
    if trained := _beyond_head(before, task):
      raise JaxftError(f"phase '{phase.name}': train.cache_features with train.seeds needs the replicas' backbones "
                       f"unchanged, but phase '{before.name}' trains {trained[0]}")
  if not task.cacheable:
    raise JaxftError(f"phase '{phase.name}': train.cache_features is not supported by {phase.cfg.task.name}")
  if other := _beyond_head(phase, task):
    raise JaxftError(f"phase '{phase.name}': train.cache_features trains the head only, but {other[0]} "
                     f"is trainable too (freeze it, e.g. train_only=[{task.head_regex}])")


def is_probe(phase: Phase, task) -> bool:
  """Whether the phase trains the task's head and nothing else (a linear probe)."""
  return task.head_key is not None and not _beyond_head(phase, task)


def _beyond_head(phase: Phase, task) -> list[str]:
  """The params phase trains outside the task's head."""
  return [p for p, l in rules.flat(phase.labels).items() if l == "train" and not re.fullmatch(task.head_regex, p)]
