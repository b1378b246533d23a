"""The train and eval steps: pure functions of (state, batch), jit-compiled with donated state.

Freezing happens here in two ways that together make it both exact and fast:
  * the gradient is taken only w.r.t. the trainable leaves (frozen ones enter as constants, so XLA
    never builds their gradients nor backpropagates below the lowest trainable layer);
  * the optimizer is optax.multi_transform over the label tree (frozen -> set_to_zero, no state),
    and frozen leaves are passed through untouched, so they stay bitwise identical.
"""
from typing import Any, Callable

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


def init_state(params, tx, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed))


def classification_loss(logits_BxC, labels_B, weights_B):
  """Weighted mean cross-entropy, plus per-example correctness for metrics."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32))
  nll_B = -jnp.take_along_axis(logp_BxC, labels_B[:, None], axis=-1)[:, 0]
  loss = jnp.sum(nll_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)
  return loss, nll_B


def make_train_step(apply: Callable, tx: optax.GradientTransformation, labels, dropout: bool = True,
                    axis_name: str | None = None, micro_steps: int = 1):
  """(state, batch) -> (state, metrics). `labels` is the 'train' / 'frozen' tree.

  axis_name: under pmap, the device axis to average gradients and metrics over.
  micro_steps: gradient accumulation; the batch is cut into this many micro-batches, scanned with
    jax.lax.scan inside the one compiled step, summing into a single gradient buffer.
  """

  def grads_of(trainable, frozen, batch, rng):
    def loss_fn(trainable):
      logits_BxC = apply(rules.merge(trainable, frozen), batch, train=dropout, rng=rng)
      loss, _ = classification_loss(logits_BxC, batch["labels"], batch["weights"])
      return loss, jnp.mean((jnp.argmax(logits_BxC, -1) == batch["labels"]).astype(jnp.float32))
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return grads, loss, accuracy

  def train_step(state: TrainState, batch):
    trainable, frozen = rules.split(state.params, labels, "train")
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name:  # each device drops out its own units
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    if micro_steps == 1:
      grads, loss, accuracy = grads_of(trainable, frozen, batch, rng)
    else:
      # Micro-batch i takes rows i, i+k, i+2k, ...: every data shard contributes to every micro-batch.
      k = micro_steps
      micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        i, mb = xs
        g, l, a = grads_of(trainable, frozen, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, l, a)), None

      init = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros(()), jnp.zeros(()))
      (grads, loss, accuracy), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
      grads, loss, accuracy = jax.tree.map(lambda x: x / k, (grads, loss, accuracy))

    if axis_name:
      grads = jax.lax.pmean(grads, axis_name)
    zeros = {p: jnp.zeros_like(x) for p, x in frozen.items()}  # consumed only by set_to_zero
    updates, opt_state = tx.update(rules.merge(grads, zeros), state.opt_state, state.params)
    updates, _ = rules.split(updates, labels, "train")
    new_trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads)}
    if axis_name:
      metrics = jax.lax.pmean(metrics, axis_name)
    new_state = state.replace(step=state.step + 1, params=rules.merge(new_trainable, frozen),
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(apply: Callable, num_classes: int, axis_name: str | None = None):
  """(params, batch) -> summed loss, example count and a confusion matrix [true, pred]."""

  def eval_step(params, batch):
    logits_BxC = apply(params, batch, train=False)
    w_B = batch["weights"]
    _, nll_B = classification_loss(logits_BxC, batch["labels"], w_B)
    pred_B = jnp.argmax(logits_BxC, -1)
    onehot_true_BxC = jax.nn.one_hot(batch["labels"], num_classes) * w_B[:, None]
    onehot_pred_BxC = jax.nn.one_hot(pred_B, num_classes)
    sums = {"loss_sum": jnp.sum(nll_B * w_B), "count": jnp.sum(w_B),
            "confusion": onehot_true_BxC.T @ onehot_pred_BxC}
    return jax.lax.psum(sums, axis_name) if axis_name else sums

  return eval_step
