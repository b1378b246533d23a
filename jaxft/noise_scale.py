"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An empirical model of
large-batch training"), a train-step hook: with gradient accumulation (train.micro_batch_size) the squared
norms of the micro-batches' gradients against the whole batch's give unbiased |G|^2 and tr(Sigma) at no extra
cost. The step keeps an EMA of both (metric `noise_scale`) and the phase's sums (`noise_scale_phase`); at the
end of a phase `report` turns the latter into the critical batch size it implies.

A step hook (step.make_train_step's `hooks`) holds its own state in TrainState.hooks[name], which restarts at
each phase: init() -> state; micro_init() and micro(acc, grads, weight) accumulate over the micro-batches;
update(state, acc, grads, batch, axis_name) -> (state, metrics) once per step.
"""
import jax
import jax.numpy as jnp
import optax

EMA = 0.95  # per-step decay of the running estimates


def estimates(small_sq, b, big_sq, B):
  """Unbiased (|G|^2, tr(Sigma)) from the mean squared norm of gradients over batches of weight b and that
  of one over weight B > b (McCandlish et al. 2018, appendix A): the gradient noise scale is their ratio."""
  g2 = (B * big_sq - b * small_sq) / (B - b)
  trace = (small_sq - big_sq) / (1 / b - 1 / B)
  return g2, trace


class NoiseScale:
  name = "noise"

  def init(self):
    """[EMA sums of |G|^2, tr(Sigma), their weight; the phase's sums of the same]."""
    return jnp.zeros((6,), jnp.float32)

  def micro_init(self):
    return jnp.zeros(3)

  def micro(self, acc, grads, weight):
    """(sum of |g_i|^2, of w_i, count) over the micro-batches that weigh anything."""
    return acc + (weight > 0) * jnp.stack([optax.tree_utils.tree_norm(grads, squared=True), weight, 1.0])

  def update(self, ema, small, grads, batch, axis_name):
    """This step's (|G|^2, tr(Sigma)) from the micro-batch gradients against the whole batch's `grads`, into
    the EMA and the phase's sums (under pmap: every device's micro-batches)."""
    big_weight = jnp.sum(batch["weights"])
    if axis_name:
      small, big_weight = jax.lax.psum(small, axis_name), jax.lax.psum(big_weight, axis_name)
    small_sq, b = small[0] / jnp.maximum(small[2], 1), small[1] / jnp.maximum(small[2], 1)
    g2, trace = estimates(small_sq, b, optax.tree_utils.tree_norm(grads, squared=True), big_weight)
    ok = (small[2] > 1) & (big_weight > b)  # two or more micro-batches that weigh anything
    now = jnp.stack([g2, trace, 1.0])
    ema = jnp.where(ok, jnp.concatenate([EMA * ema[:3] + (1 - EMA) * now, ema[3:] + now]), ema)
    g2_s, trace_s = ema[0] / jnp.maximum(ema[2], 1e-12), ema[1] / jnp.maximum(ema[2], 1e-12)
    # late in a run |G|^2 can fall within its noise (the EMA's estimate <= 0): the phase's sums still resolve it
    return ema, {"noise_scale": trace_s / g2_s, "noise_grad_sq": g2_s, "noise_trace": trace_s,
                 "noise_scale_phase": ema[4] / ema[3], "batch_weight": big_weight}


def report(phase: str, batch: int, step: int, m: dict) -> str:
  """The critical batch size that a phase's gradient noise scale implies (steps S = S_min (1 + B_noise / B),
  examples E = E_min (1 + B / B_noise)), from its sums of |G|^2 and tr(Sigma) in the last logged metrics `m`
  (the EMA's last value can be unresolved: |G|^2 within its noise near convergence)."""
  scale = m["noise_scale_phase"]
  per_example = batch / m["batch_weight"]  # loss weights (examples, or tokens) -> examples
  ema = m["noise_scale"] * per_example
  if not scale > 0:
    return (f"phase {phase}: gradient noise scale unresolved (|G|^2 estimated <= 0 over the phase: the gradient's "
            f"signal is within its noise at batch {batch}; try more micro-batches)")
  examples = scale * per_example
  ci = f" ± {m['noise_scale_phase_ci'] * per_example:.0f}" if "noise_scale_phase_ci" in m else ""
  steps, data = 1 + examples / batch, 1 + batch / examples  # x the fewest steps / examples, at this batch
  return (f"phase {phase}: gradient noise scale B_simple {examples:.0f}{ci} examples over its steps to {step} "
          f"({scale:.0f} in loss weights; the last EMA {ema:.0f}), the critical batch size it implies. "
          f"Batch {batch} takes {steps:.2f}x the fewest steps and {data:.2f}x the fewest examples; batch {examples:.0f} "
          f"would take {steps / 2:.2f}x fewer steps for {2 / data:.2f}x the examples")
