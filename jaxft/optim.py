"""Optimizer: LR schedule + clipping + optimizer, wrapped in optax.multi_transform over labels."""
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


def base_optimizer(ocfg, lr, decay_mask) -> optax.GradientTransformation:
  wd = ocfg.weight_decay
  return {
      "adamw": lambda: optax.adamw(lr, ocfg.b1, ocfg.b2, ocfg.eps, weight_decay=wd, mask=decay_mask),
      "adam": lambda: optax.adam(lr, ocfg.b1, ocfg.b2, ocfg.eps),
      "sgd": lambda: optax.chain(optax.add_decayed_weights(wd, decay_mask),
                                 optax.sgd(lr, momentum=ocfg.momentum or None, nesterov=ocfg.nesterov)),
      "lars": lambda: optax.lars(lr, weight_decay=wd, weight_decay_mask=decay_mask,
                                 trust_ratio_mask=decay_mask, momentum=ocfg.momentum, nesterov=ocfg.nesterov),
      "lamb": lambda: optax.lamb(lr, ocfg.b1, ocfg.b2, ocfg.eps, weight_decay=wd, mask=decay_mask),
      "adafactor": lambda: optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask),
      "lion": lambda: optax.lion(lr, ocfg.b1, ocfg.b2, weight_decay=wd, mask=decay_mask),
  }[ocfg.name]()


def make_optimizer(ocfg, params, labels, total_steps: int, batch_size: int):
  """Returns (tx, lr_schedule); frozen leaves get optax.set_to_zero() and hold no state."""
  lr = schedule(ocfg, total_steps, scaled_lr(ocfg, batch_size))
  opt = base_optimizer(ocfg, lr, rules.weight_decay_mask(params))
  chain = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm > 0 else []
  tx = optax.chain(*chain, opt)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), lr
