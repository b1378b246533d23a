"""Optimizer: LR schedule + clipping + optimizer, wrapped in optax.multi_transform over labels."""
import optax

from jaxft import rules


def schedule(ocfg, total_steps: int) -> optax.Schedule:
  warmup = int(round(ocfg.warmup_ratio * total_steps))
  decay_steps = max(1, total_steps - warmup)
  after = {
      "linear": optax.linear_schedule(ocfg.lr, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(ocfg.lr, decay_steps),
      "constant": optax.constant_schedule(ocfg.lr),
  }[ocfg.schedule]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, ocfg.lr, warmup), after], [warmup])


def make_optimizer(ocfg, params, labels, total_steps: int):
  """Returns (tx, lr_schedule); frozen leaves get optax.set_to_zero() and hold no state."""
  lr = schedule(ocfg, total_steps)
  if ocfg.name == "adamw":
    opt = optax.adamw(lr, ocfg.b1, ocfg.b2, ocfg.eps, weight_decay=ocfg.weight_decay,
                      mask=rules.weight_decay_mask(params))
  elif ocfg.name == "adam":
    opt = optax.adam(lr, ocfg.b1, ocfg.b2, ocfg.eps)
  else:
    opt = optax.sgd(lr, momentum=ocfg.b1)
  chain = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm > 0 else []
  tx = optax.chain(*chain, opt)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), lr
