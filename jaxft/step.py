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

from jaxft import hparams, rules


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; the dropout key of step s is fold_in(rng, s)
  model_state: Any = dataclasses.field(default_factory=dict)  # mutable model state (BatchNorm statistics)
  skipped: jax.Array = None  # how many steps had a non-finite loss or gradient (their update skipped)
  first_skipped: jax.Array = None  # the first such step, -1 if none
  hooks: Any = None  # the step hooks' own state, {name: ...} (noise_scale.py), restarted at each phase


def init_state(params, tx, seed: int, model_state=None, hooks=()) -> TrainState:
  """hooks: the step hooks whose state the train state holds (noise_scale.NoiseScale)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed), model_state=model_state or {},
                    skipped=jnp.zeros((), jnp.int32), first_skipped=jnp.full((), -1, jnp.int32),
                    hooks={h.name: h.init() for h in hooks} if hooks else None)


def make_train_step(apply: Callable, loss: Callable, tx: optax.GradientTransformation, labels,
                    dropout: bool = True, axis_name: str | None = None, micro_steps: int = 1,
                    opt_metrics: Callable | None = None, hooks: tuple = (), units: int = 1):
  """(state, batch) -> (state, metrics). `labels` is the 'train' / 'frozen' tree.

  apply(params, batch, train, rng, model_state) -> (outputs, model_state): called with train=True (BatchNorm
    uses batch statistics) and rng=None where `dropout` is off;
  loss(outputs, batch) -> (scalar loss, {name: scalar} metrics): a mean over what batch["weights"]
    weighs (examples or tokens), so that the step can combine parts of a batch by their weight.

  axis_name: under pmap, the device axis to average gradients and metrics over, each device weighted
    by its sum of weights (tokens differ between devices): the result is the whole batch's mean.
  micro_steps: gradient accumulation; the batch is cut into this many micro-batches, scanned with
    jax.lax.scan inside the one compiled step, summing into a single gradient buffer (micro-batches
    weighted by their sum of weights, as devices are).
  opt_metrics: optimizer state -> metrics of the step (LARS / LAMB trust ratios).
  hooks: with micro-batches, what else reads their gradients (noise_scale.NoiseScale: the gradient noise
    scale), each with its state in state.hooks[name] and metrics of its own.
  units: what a step adds to state.step (train.batch_schedule counts batches of train.batch_size).
  """

  def grads_of(trainable, frozen, model_state, batch, rng):
    def loss_fn(trainable):
      with hparams.scope(model_state):  # a sweep replica's own label smoothing, LoRA scale, ...
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
        (sums, accs, model_state), (i, mb) = carry, xs
        g, l, a, model_state = grads_of(trainable, frozen, model_state, mb, jax.random.fold_in(rng, i))
        w = jnp.sum(mb["weights"])
        accs = {h.name: h.micro(accs[h.name], g, w) for h in hooks}
        return (jax.tree.map(lambda s, x: s + w * x, sums, (g, l, a, 1.0)), accs, model_state), None

      shapes = jax.eval_shape(lambda: grads_of(trainable, frozen, state.model_state,
                                               jax.tree.map(lambda x: x[0], micro), rng)[:3])
      init = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes + (jnp.zeros(()),)),
              {h.name: h.micro_init() for h in hooks}, state.model_state)
      ((grads, value, aux, total), accs, model_state), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
      grads, value, aux = jax.tree.map(lambda x: x / jnp.maximum(total, 1e-12), (grads, value, aux))

    if axis_name:  # the whole batch's mean: devices weighted by their sum of weights
      w = jnp.sum(batch["weights"])
      total = jnp.maximum(jax.lax.psum(w, axis_name), 1e-12)
      grads, value, aux = jax.tree.map(lambda x: jax.lax.psum(w * x, axis_name) / total, (grads, value, aux))
      model_state = jax.lax.pmean(model_state, axis_name)  # BatchNorm statistics agree across devices
    hooked = hooks if micro_steps > 1 else ()
    new_hooks, hook_metrics = {}, {}
    for h in hooked:
      new_hooks[h.name], m = h.update(state.hooks[h.name], accs[h.name], grads, batch, axis_name)
      hook_metrics.update(m)
    # consumed only by set_to_zero (float: a quantized base's integer leaves too, model.quantize)
    zeros = {p: jnp.zeros(x.shape, x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
             for p, x in frozen.items()}
    updates, opt_state = tx.update(rules.merge(grads, zeros), state.opt_state, state.params)
    updates, _ = rules.split(updates, labels, "train")
    new_trainable = optax.apply_updates(trainable, updates)
    grad_norm = optax.global_norm(grads)
    # A non-finite loss or gradient must not reach the params: that step's update is dropped, counted.
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    metrics = {"loss": value, **aux, "grad_norm": grad_norm, **hook_metrics,
               **(opt_metrics(opt_state) if opt_metrics else {})}
    new_state = state.replace(
        step=state.step + units, params=rules.merge(keep(new_trainable, trainable), frozen),
        opt_state=keep(opt_state, state.opt_state), model_state=keep(model_state, state.model_state),
        hooks=keep(new_hooks, state.hooks) if hooked else state.hooks,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        first_skipped=jnp.where(finite | (state.first_skipped >= 0), state.first_skipped, state.step + 1))
    return new_state, metrics

  return train_step


def make_eval_step(apply: Callable, task, axis_name: str | None = None):
  """(params, model_state, batch) -> (the task's summed eval arrays, its per-row outputs): under pmap
  the sums are psum-ed and the rows all-gathered over devices."""

  def eval_step(params, model_state, batch):
    with hparams.scope(model_state):
      outputs, _ = apply(params, batch, False, None, model_state)
      sums, rows = task.eval_sums(outputs, batch), task.eval_rows(outputs, batch)
    if axis_name:
      sums = jax.lax.psum(sums, axis_name)
      rows = jax.lax.all_gather(rows, axis_name, tiled=True)
    return sums, rows

  return eval_step
