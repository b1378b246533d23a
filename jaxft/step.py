"""The train and eval steps: pure functions of (state, batch), jit-compiled with donated state. The
model's apply and the loss come from the experiment (backbone + task head, the task's loss).

Freezing happens here in two ways that together make it both exact and fast:
  * the gradient is taken only w.r.t. the trainable leaves (frozen ones enter as constants, so XLA
    never builds their gradients nor backpropagates below the lowest trainable layer);
  * the optimizer is optax.multi_transform over the label tree (frozen -> set_to_zero, no state),
    and frozen leaves are passed through untouched, so they stay bitwise identical.
"""
import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxft import rules


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; the dropout key of step s is fold_in(rng, s)
  model_state: Any = dataclasses.field(default_factory=dict)  # mutable model state (BatchNorm statistics)
  skipped: jax.Array = None  # how many steps had a non-finite loss or gradient (their update skipped)
  first_skipped: jax.Array = None  # the first such step, -1 if none
  noise: jax.Array = None  # accumulation only: [EMA sums of |G|^2, tr(Sigma), their weight; phase sums of the same]


NOISE_EMA = 0.95  # per-step decay of the gradient noise scale's running estimates


def init_state(params, tx, seed: int, model_state=None, noise: bool = False) -> TrainState:
  """noise: the state tracks the gradient noise scale (gradient accumulation: micro_steps > 1)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed), model_state=model_state or {},
                    skipped=jnp.zeros((), jnp.int32), first_skipped=jnp.full((), -1, jnp.int32),
                    noise=jnp.zeros((6,), jnp.float32) if noise else None)


def noise_estimates(small_sq, b, big_sq, B):
  """Unbiased (|G|^2, tr(Sigma)) from the mean squared norm of gradients over batches of weight b and that
  of one over weight B > b (McCandlish et al. 2018, appendix A): the gradient noise scale is their ratio."""
  g2 = (B * big_sq - b * small_sq) / (B - b)
  trace = (small_sq - big_sq) / (1 / b - 1 / B)
  return g2, trace


def make_train_step(apply: Callable, loss: Callable, tx: optax.GradientTransformation, labels,
                    dropout: bool = True, axis_name: str | None = None, micro_steps: int = 1,
                    opt_metrics: Callable | None = None):
  """(state, batch) -> (state, metrics). `labels` is the 'train' / 'frozen' tree.

  apply(params, batch, train, rng, model_state) -> (outputs, model_state): called with train=True (BatchNorm
    uses batch statistics) and rng=None where `dropout` is off;
  loss(outputs, batch) -> (scalar loss, {name: scalar} metrics): a mean over what batch["weights"]
    weighs (examples or tokens), so that the step can combine parts of a batch by their weight.

  axis_name: under pmap, the device axis to average gradients and metrics over, each device weighted
    by its sum of weights (tokens differ between devices): the result is the whole batch's mean.
  micro_steps: gradient accumulation; the batch is cut into this many micro-batches, scanned with
    jax.lax.scan inside the one compiled step, summing into a single gradient buffer (micro-batches
    weighted by their sum of weights, as devices are). The micro-batches' gradients then also give the
    gradient noise scale B_simple = tr(Sigma) / |G|^2 (state.noise, metric `noise_scale`, in units of
    batch["weights"]: examples, or tokens), from their squared norms against the whole batch's.
  opt_metrics: optimizer state -> metrics of the step (LARS / LAMB trust ratios).
  """

  def grads_of(trainable, frozen, model_state, batch, rng):
    def loss_fn(trainable):
      outputs, new_model_state = apply(rules.merge(trainable, frozen), batch, True, rng if dropout else None,
                                       model_state)
      value, aux = loss(outputs, batch)
      return value, (aux, new_model_state)
    (value, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return grads, value, aux, model_state

  def train_step(state: TrainState, batch):
    trainable, frozen = rules.split(state.params, labels, "train")
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name:  # each device drops out its own units
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    if micro_steps == 1:
      grads, value, aux, model_state = grads_of(trainable, frozen, state.model_state, batch, rng)
    else:
      # Micro-batch i takes rows i, i+k, i+2k, ...: every data shard contributes to every micro-batch.
      k = micro_steps
      micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        (sums, small, model_state), (i, mb) = carry, xs
        g, l, a, model_state = grads_of(trainable, frozen, model_state, mb, jax.random.fold_in(rng, i))
        w = jnp.sum(mb["weights"])
        # (sum of |g_i|^2, of w_i, count) over the micro-batches that weigh anything
        small = small + (w > 0) * jnp.stack([optax.tree_utils.tree_norm(g, squared=True), w, 1.0])
        return (jax.tree.map(lambda s, x: s + w * x, sums, (g, l, a, 1.0)), small, model_state), None

      shapes = jax.eval_shape(lambda: grads_of(trainable, frozen, state.model_state,
                                               jax.tree.map(lambda x: x[0], micro), rng)[:3])
      init = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes + (jnp.zeros(()),)), jnp.zeros(3),
              state.model_state)
      ((grads, value, aux, total), small, model_state), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
      grads, value, aux = jax.tree.map(lambda x: x / jnp.maximum(total, 1e-12), (grads, value, aux))

    if axis_name:  # the whole batch's mean: devices weighted by their sum of weights
      w = jnp.sum(batch["weights"])
      total = jnp.maximum(jax.lax.psum(w, axis_name), 1e-12)
      grads, value, aux = jax.tree.map(lambda x: jax.lax.psum(w * x, axis_name) / total, (grads, value, aux))
      model_state = jax.lax.pmean(model_state, axis_name)  # BatchNorm statistics agree across devices
      if micro_steps > 1:  # the small batches: every device's micro-batches
        small = jax.lax.psum(small, axis_name)
    if micro_steps > 1:
      noise, noise_metrics = _noise_update(state.noise, small, grads, batch, axis_name)
    zeros = {p: jnp.zeros_like(x) for p, x in frozen.items()}  # consumed only by set_to_zero
    updates, opt_state = tx.update(rules.merge(grads, zeros), state.opt_state, state.params)
    updates, _ = rules.split(updates, labels, "train")
    new_trainable = optax.apply_updates(trainable, updates)
    grad_norm = optax.global_norm(grads)
    # A non-finite loss or gradient must not reach the params: that step's update is dropped, counted.
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    metrics = {"loss": value, **aux, "grad_norm": grad_norm, **(noise_metrics if micro_steps > 1 else {}),
               **(opt_metrics(opt_state) if opt_metrics else {})}
    new_state = state.replace(
        step=state.step + 1, params=rules.merge(keep(new_trainable, trainable), frozen),
        opt_state=keep(opt_state, state.opt_state), model_state=keep(model_state, state.model_state),
        noise=keep(noise, state.noise) if micro_steps > 1 else state.noise,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        first_skipped=jnp.where(finite | (state.first_skipped >= 0), state.first_skipped, state.step + 1))
    return new_state, metrics

  return train_step


def _noise_update(ema, small, grads, batch, axis_name):
  """(new noise state, metrics) of the gradient noise scale: this step's (|G|^2, tr(Sigma)) from the micro-batch
  gradients (small: sum of |g_i|^2, of w_i, count) against the whole batch's gradient `grads`, into an EMA
  (`noise_scale`) and the phase's sums (`noise_scale_phase`: their ratio over every step so far)."""
  big_weight = jnp.sum(batch["weights"])
  if axis_name:
    big_weight = jax.lax.psum(big_weight, axis_name)
  small_sq, b = small[0] / jnp.maximum(small[2], 1), small[1] / jnp.maximum(small[2], 1)
  g2, trace = noise_estimates(small_sq, b, optax.tree_utils.tree_norm(grads, squared=True), big_weight)
  ok = (small[2] > 1) & (big_weight > b)  # two or more micro-batches that weigh anything
  now = jnp.stack([g2, trace, 1.0])
  ema = jnp.where(ok, jnp.concatenate([NOISE_EMA * ema[:3] + (1 - NOISE_EMA) * now, ema[3:] + now]), ema)
  g2_s, trace_s = ema[0] / jnp.maximum(ema[2], 1e-12), ema[1] / jnp.maximum(ema[2], 1e-12)
  # late in a run |G|^2 can fall within its noise (the EMA's estimate <= 0): the phase's sums still resolve it
  return ema, {"noise_scale": trace_s / g2_s, "noise_grad_sq": g2_s, "noise_trace": trace_s,
               "noise_scale_phase": ema[4] / ema[3], "batch_weight": big_weight}


def make_eval_step(apply: Callable, task, axis_name: str | None = None):
  """(params, model_state, batch) -> (the task's summed eval arrays, its per-row outputs): under pmap
  the sums are psum-ed and the rows all-gathered over devices."""

  def eval_step(params, model_state, batch):
    outputs, _ = apply(params, batch, False, None, model_state)
    sums, rows = task.eval_sums(outputs, batch), task.eval_rows(outputs, batch)
    if axis_name:
      sums = jax.lax.psum(sums, axis_name)
      rows = jax.lax.all_gather(rows, axis_name, tiled=True)
    return sums, rows

  return eval_step
