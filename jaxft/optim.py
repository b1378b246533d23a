"""Optimizer: clipping, then optax.multi_transform of one optimizer per param group over a label tree.

Every trainable leaf gets a group from path rules: an LR multiplier (optim.groups' lr_mult times the
layer-wise decay) and a weight decay (optim.groups' weight_decay, else none on biases and norm
scales, else optim.weight_decay). Leaves with equal (lr multiplier, weight decay) share one optax
optimizer; frozen leaves get optax.set_to_zero() and hold no state.
"""
import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft import rules


def schedule(ocfg, total_steps: int, peak) -> optax.Schedule:
  """Linear warmup to `peak` over warmup_ratio of the steps, then linear / cosine decay or constant: optax's
  linear_schedule, cosine_decay_schedule and join_schedules, written out in jnp so that `peak` and warmup_ratio
  may be a replica's traced values (train.sweep)."""
  warmup = jnp.round(ocfg.warmup_ratio * total_steps)
  decay_steps = jnp.maximum(1.0, total_steps - warmup)

  def after(count):
    if ocfg.schedule == "constant":
      return jnp.asarray(peak, jnp.float32) * jnp.ones_like(count, jnp.float32)
    count = jnp.minimum(count, decay_steps) if ocfg.schedule == "cosine" else jnp.clip(count, 0, decay_steps)
    if ocfg.schedule == "cosine":
      return peak * (0.5 * (1 + jnp.cos(jnp.pi * count / decay_steps)))
    return peak * (1 - count / decay_steps)

  def lr(count):
    warm = (0.0 - peak) * (1 - jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1.0)) + peak
    return jnp.where(count < warmup, warm, after(count - warmup))
  return lr


def scaled_lr(ocfg, batch_size: int) -> float:
  """Peak LR scaled from optim.base_batch_size to the global batch: linear (Goyal et al. 2017) or
  sqrt (for adaptive optimizers such as LAMB)."""
  ratio = batch_size / ocfg.base_batch_size
  return ocfg.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[ocfg.scale_lr]


def layer_depth(path: str, n_layers: int, conv) -> int:
  """0 for embeddings, i + 1 for layer i, n_layers + 1 for everything else (head, pooler)."""
  if conv.embeddings and re.fullmatch(conv.embeddings, path):
    return 0
  if (i := rules.layer_index(path, conv)) is not None:
    return i + 1
  return n_layers + 1


def lr_multipliers(ocfg, params, conv):
  """Per-leaf LR multiplier: the first matching group's lr_mult, times layer_decay ** (L + 1 - depth)
  (embeddings decay^(L+1), layer i decay^(L-i), head 1; BEiT / ELECTRA layer-wise decay)."""
  group = rules.flat(rules.apply_rules(params, [(g["match"], g.get("lr_mult", 1.0)) for g in ocfg.groups],
                                       default=1.0, what="optim.groups match"))
  if not ocfg.layer_decay:
    return rules.merge(group)
  n = rules.num_layers(params, conv)
  return rules.merge({p: m * ocfg.layer_decay ** (n + 1 - layer_depth(p, n, conv)) for p, m in group.items()})


def weight_decays(ocfg, params, conv, default=None):
  """Per-leaf weight decay: groups that set weight_decay first, then none on biases / norm scales, else
  `default` (optim.weight_decay unless given: None marks the leaves that take a swept one)."""
  user = [(g["match"], g["weight_decay"]) for g in ocfg.groups if "weight_decay" in g]
  no_decay = [(r, 0.0) for r in conv.no_decay]
  return rules.apply_rules(params, user + no_decay, default=ocfg.weight_decay if default is None else default,
                           strict=False)


class TrustRatioState(NamedTuple):
  ratios: dict  # per param: the trust ratio of the last update


def scale_by_trust_ratio(trust_coefficient: float = 1.0, eps: float = 0.0) -> optax.GradientTransformation:
  """optax.scale_by_trust_ratio that keeps each param's ratio |w| / |u| in its state, to be logged."""
  inner = optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)

  def init(params):
    return TrustRatioState(jax.tree.map(lambda _: jnp.ones((), jnp.float32), params))

  def update(updates, state, params):
    scaled, _ = inner.update(updates, optax.EmptyState(), params)
    ratio = lambda s, u: jnp.where(jnp.any(u != 0), optax.tree_utils.tree_norm(s) / jnp.maximum(  # noqa: E731
        optax.tree_utils.tree_norm(u), 1e-30), 1.0).astype(jnp.float32)
    return scaled, TrustRatioState(jax.tree.map(ratio, scaled, updates))

  return optax.GradientTransformation(init, update)


def trust_ratio_groups(params, conv) -> dict:
  """{param path: its layer group (embeddings, layer_i, other)} for the trust-ratio metrics."""
  n = rules.num_layers(params, conv)
  name = lambda d: "embeddings" if d == 0 else (f"layer_{d - 1}" if d <= n else "other")  # noqa: E731
  return {p: name(layer_depth(p, n, conv)) for p in rules.flat(params)}


def trust_ratio_metrics(opt_state, groups: dict) -> dict:
  """{`trust_ratio/<group>`: the mean LARS / LAMB trust ratio of the group's params} from an optimizer state
  ({} for other optimizers)."""
  found = {}
  nodes = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=lambda x: isinstance(x, TrustRatioState))[0]
  for _, node in nodes:
    if isinstance(node, TrustRatioState):
      for kp, r in jax.tree_util.tree_flatten_with_path(node.ratios)[0]:
        path = "/".join(str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey))
        found.setdefault(groups.get(path, "other"), []).append(r)
  return {f"trust_ratio/{g}": jnp.mean(jnp.stack(rs)) for g, rs in sorted(found.items())}


OPTIMIZERS = ("adamw", "adam", "sgd", "lars", "lamb", "adafactor", "lion")  # optim.name


def base_optimizer(ocfg, lr, wd: float, trust_mask) -> optax.GradientTransformation:
  return {
      "adamw": lambda: optax.adamw(lr, ocfg.b1, ocfg.b2, ocfg.eps, weight_decay=wd),
      "adam": lambda: optax.adam(lr, ocfg.b1, ocfg.b2, ocfg.eps),
      "sgd": lambda: optax.chain(optax.add_decayed_weights(wd),
                                 optax.sgd(lr, momentum=ocfg.momentum or None, nesterov=ocfg.nesterov)),
      # optax.lars and optax.lamb, with trust ratios that the train step logs
      "lars": lambda: optax.chain(optax.add_decayed_weights(wd), optax.masked(scale_by_trust_ratio(0.001), trust_mask),
                                  optax.scale_by_learning_rate(lr),
                                  optax.trace(decay=ocfg.momentum, nesterov=ocfg.nesterov)),
      "lamb": lambda: optax.chain(optax.scale_by_adam(ocfg.b1, ocfg.b2, ocfg.eps), optax.add_decayed_weights(wd),
                                  scale_by_trust_ratio(), optax.scale_by_learning_rate(lr)),
      "adafactor": lambda: optax.adafactor(lr, weight_decay_rate=wd or None),
      "lion": lambda: optax.lion(lr, ocfg.b1, ocfg.b2, weight_decay=wd),
  }[ocfg.name]()


SWEEPABLE = ("lr", "weight_decay", "warmup_ratio", "b1", "b2")  # optim keys a replica may hold its own of
GROUP_LR_MULT = re.compile(r"groups\.(\d+)\.lr_mult")  # ... and optim.groups.N.lr_mult: group N's LR multiplier


class SweptState(NamedTuple):
  hparams: dict  # {optim key: f32 scalar}: this replica's values of the swept keys (train.sweep)
  inner: Any  # the optimizer's own state


def swept(build, values: dict, advance: int = 0) -> optax.GradientTransformation:
  """An optimizer whose hyperparameters live in its state (`hparams`): build(hparams) -> the optimizer, rebuilt
  at each update from the state's values, so that replicas of one step each train with their own (init: these
  `values`; a replica's go in with `with_hparams`). advance: what each update adds to hparams["units"] (the
  schedule's clock under train.batch_schedule: units of train.batch_size, not updates)."""
  def init(params):
    return SweptState(as_hparams(values), build(values).init(params))

  def update(updates, state, params=None):
    updates, inner = build(state.hparams).update(updates, state.inner, params)
    hparams = {**state.hparams, "units": state.hparams["units"] + advance} if advance else state.hparams
    return updates, SweptState(hparams, inner)

  return optax.GradientTransformation(init, update)


def hparams_of(setting: dict) -> dict:
  """{optim key: value} of train.sweep's optim.* keys in a {config key: value} setting."""
  return {key.removeprefix("optim."): value for key, value in setting.items() if key.startswith("optim.")}


def current(ocfg, key: str) -> float:
  """The config's value of a sweepable optim key (`groups.N.lr_mult` included)."""
  if m := GROUP_LR_MULT.fullmatch(key):
    return ocfg.groups[int(m.group(1))].get("lr_mult", 1.0)
  return getattr(ocfg, key)


def as_hparams(values: dict) -> dict:
  return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


def with_hparams(opt_state, values: dict):
  """An initial optimizer state holding these values of its swept keys."""
  return opt_state._replace(hparams=as_hparams(values))


def group_labels(ocfg, params, freeze_labels, conv, swept_keys=()):
  """(the optimizer's label tree: 'frozen', or 'lr{mult}_wd{decay}' per trainable leaf,
  {label: (lr multiplier, weight decay)} of the trainable labels). Where weight_decay is swept, the leaves
  that take it are 'lr{mult}_wd(swept)' with decay None; where a group's lr_mult is, its leaves' multiplier is
  (its key, their layer-decay factor): 'lr(groups.N.lr_mult)x{factor}_wd...'."""
  sweeps_wd = "weight_decay" in swept_keys
  mult = rules.flat(lr_multipliers(ocfg, params, conv))
  swept_group = {}  # leaf -> (its group's swept key, its layer-decay factor), where a group's lr_mult is swept
  if any(map(GROUP_LR_MULT.fullmatch, swept_keys)):
    index = rules.flat(rules.apply_rules(params, [(g["match"], i) for i, g in enumerate(ocfg.groups)], default=-1,
                                         what="optim.groups match"))
    ones = dataclasses.replace(ocfg, groups=[{**g, "lr_mult": 1.0} for g in ocfg.groups])
    factor = rules.flat(lr_multipliers(ones, params, conv))
    swept_group = {p: (f"groups.{i}.lr_mult", factor[p]) for p, i in index.items()
                   if f"groups.{i}.lr_mult" in swept_keys}
  wd = rules.flat(weight_decays(ocfg, params, conv, default=math.nan if sweeps_wd else None))
  labels, groups = {}, {}
  for p, status in rules.flat(freeze_labels).items():
    if status == "frozen":
      labels[p] = "frozen"
    else:
      decay = None if math.isnan(wd[p]) else wd[p]
      m = swept_group.get(p, mult[p])
      lr_label = f"lr({m[0]})x{m[1]:.6g}" if p in swept_group else f"lr{mult[p]:.6g}"
      labels[p] = f"{lr_label}_wd" + ("(swept)" if decay is None else f"{decay:.6g}")
      groups[labels[p]] = (m, decay)
  return rules.merge(labels), groups


def make_optimizer(ocfg, params, freeze_labels, total_steps: int, batch_size: int, conv, swept_keys=(),
                   units: int | None = None):
  """Returns (tx, lr_schedule), lr_schedule being the peak schedule that multipliers scale.
  `conv`: the model family's Conventions (embeddings, layers, no-decay params). swept_keys: optim keys whose
  values each replica holds in its optimizer state (`swept`; train.sweep). units: train.batch_schedule's
  batches of `units` x batch_size: the schedule runs over units (total_steps of them; its clock in the state,
  hparams["units"]) with its peak scaled to the larger batch; every `units` gives the same state."""
  labels, groups = group_labels(ocfg, params, freeze_labels, conv, swept_keys)
  trust_mask = rules.weight_decay_mask(params, conv)  # LARS: no trust ratio on biases / norm scales

  def build(hparams: dict):
    plain = {k: v for k, v in hparams.items() if not GROUP_LR_MULT.fullmatch(k) and k != "units"}
    o = dataclasses.replace(ocfg, **plain) if plain else ocfg
    peak = schedule(o, total_steps, scaled_lr(o, batch_size * (units or 1)))
    lr = (lambda _: peak(hparams["units"])) if units else peak  # noqa: E731 (batch_schedule: over units)
    txs = {"frozen": optax.set_to_zero()}
    for label, (mult, wd) in groups.items():
      if isinstance(mult, tuple):  # a swept group's: its own (the config's outside the step) x the layer decay
        mult = hparams.get(mult[0], current(ocfg, mult[0])) * mult[1]
      txs[label] = base_optimizer(o, lambda s, m=mult: m * lr(s), o.weight_decay if wd is None else wd, trust_mask)
    clip = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    return optax.chain(*clip, optax.multi_transform(txs, labels)), peak

  start = {k: current(ocfg, k) for k in swept_keys} | ({"units": 0.0} if units else {})
  tx, peak = build(start)
  if start:
    tx = swept(lambda hparams: build(hparams)[0], start, advance=units or 0)
  return tx, peak
