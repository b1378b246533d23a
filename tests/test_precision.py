"""precision.compute / precision.params and model.remat change how the step runs, not what it computes."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import rules
from jaxft.data import batching
from jaxft.experiment import build
from jaxft.step import make_train_step


def two_steps(exp):
  step = jax.jit(make_train_step(exp.apply, exp.task.loss, exp.tx, exp.labels, dropout=False))
  batches = batching.bucketed(exp.splits["train"], exp.task.collate, 16, 2, 0, [32])
  state, losses = exp.initial_state(), []
  for i in range(2):
    state, m = step(state, batches[i])
    losses.append(float(m["loss"]))
  return np.array(losses), rules.flat(jax.device_get(state.params))


def test_remat_block_is_exact(tiny_cfg):
  ref_loss, ref = two_steps(build(tiny_cfg(), print))
  loss, params = two_steps(build(tiny_cfg("model.remat=block"), print))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for p, x in ref.items():
    np.testing.assert_allclose(params[p], x, rtol=1e-5, atol=1e-6, err_msg=p)


def test_bf16_compute_keeps_f32_params(tiny_cfg):
  ref_loss, _ = two_steps(build(tiny_cfg(), print))
  exp = build(tiny_cfg("precision.compute=bfloat16"), print)
  batch = batching.bucketed(exp.splits["train"], exp.task.collate, 16, 1, 0, [32])[0]
  hlo = jax.jit(lambda p: exp.apply(p, batch)[0]).lower(exp.initial_state().params).as_text()
  assert "bf16" in hlo and "dot_general" in hlo  # the matmuls run in bf16
  loss, params = two_steps(exp)
  assert all(x.dtype == jnp.float32 for x in params.values())
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)


def test_bf16_params(tiny_cfg):
  exp = build(tiny_cfg("precision.params=bfloat16"), print)
  assert all(x.dtype == jnp.bfloat16 for x in rules.flat(exp.initial_state().params).values())
  loss, params = two_steps(exp)
  assert np.all(np.isfinite(loss)) and all(x.dtype == jnp.bfloat16 for x in params.values())
