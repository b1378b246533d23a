"""Optimizer: clipping, then optax.multi_transform of one optimizer per param group over a label tree.

Every trainable leaf gets a group from path rules: an LR multiplier (optim.groups' lr_mult times the
layer-wise decay) and a weight decay (optim.groups' weight_decay, else none on biases and norm
scales, else optim.weight_decay). Leaves with equal (lr multiplier, weight decay) share one optax
optimizer; frozen leaves get optax.set_to_zero() and hold no state.
"""
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft import rules


def schedule(ocfg, total_steps: int, peak: float) -> optax.Schedule:
  """Linear warmup to `peak` over warmup_ratio of the steps, then linear / cosine decay or constant."""
  warmup = int(round(ocfg.warmup_ratio * total_steps))
  decay_steps = max(1, total_steps - warmup)
  after = {
      "linear": optax.linear_schedule(peak, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(peak, decay_steps),
      "constant": optax.constant_schedule(peak),
  }[ocfg.schedule]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


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


def weight_decays(ocfg, params, conv):
  """Per-leaf weight decay: groups that set weight_decay first, then none on biases / norm scales."""
  user = [(g["match"], g["weight_decay"]) for g in ocfg.groups if "weight_decay" in g]
  no_decay = [(r, 0.0) for r in conv.no_decay]
  return rules.apply_rules(params, user + no_decay, default=ocfg.weight_decay, strict=False)


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


def group_labels(ocfg, params, freeze_labels, conv):
  """(the optimizer's label tree: 'frozen', or 'lr{mult}_wd{decay}' per trainable leaf,
  {label: (lr multiplier, weight decay)} of the trainable labels)."""
  mult, wd = rules.flat(lr_multipliers(ocfg, params, conv)), rules.flat(weight_decays(ocfg, params, conv))
  labels, groups = {}, {}
  for p, status in rules.flat(freeze_labels).items():
    if status == "frozen":
      labels[p] = "frozen"
    else:
      labels[p] = f"lr{mult[p]:.6g}_wd{wd[p]:.6g}"
      groups[labels[p]] = (mult[p], wd[p])
  return rules.merge(labels), groups


def make_optimizer(ocfg, params, freeze_labels, total_steps: int, batch_size: int, conv):
  """Returns (tx, lr_schedule), lr_schedule being the peak schedule that multipliers scale.
  `conv`: the model family's Conventions (embeddings, layers, no-decay params)."""
  lr = schedule(ocfg, total_steps, scaled_lr(ocfg, batch_size))
  labels, groups = group_labels(ocfg, params, freeze_labels, conv)
  trust_mask = rules.weight_decay_mask(params, conv)  # LARS: no trust ratio on biases / norm scales
  txs = {"frozen": optax.set_to_zero()}
  for label, (mult, wd) in groups.items():
    txs[label] = base_optimizer(ocfg, lambda s, m=mult: m * lr(s), wd, trust_mask)
  clip = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm > 0 else []
  return optax.chain(*clip, optax.multi_transform(txs, labels)), lr
