"""The splash attention kernel (TPU; here in Pallas' interpret mode) computes what XLA's attention does for
packed and padded rows, forward and backward, and its analytic cost counts the causal blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import llama, splash


@pytest.mark.parametrize("rows", ["packed", "padded"])
def test_splash_equals_xla_attention(rows):
  B, L, N, K, H = 2, 256, 4, 2, 128  # GQA: 2 query heads per key / value head
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.standard_normal((B, L, n, H)), jnp.float32) for n in (N, K, K))
  segments = np.zeros((B, L), np.int32)  # 0: padding
  if rows == "packed":
    segments[0, :100], segments[0, 100:230], segments[1, :] = 1, 2, 1
    batch = {"input_ids": segments, "segment_ids": segments}
  else:
    segments[0, :77], segments[1, :200] = 1, 1
    batch = {"input_ids": segments, "attention_mask": segments}
  visible = llama.visibility(batch)
  assert np.array_equal(llama.visibility(batch, segments=True), segments)

  def xla(q, k, v):
    if visible.ndim == 1:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=visible)
    return jax.nn.dot_product_attention(q, k, v, mask=visible)

  def kernel(q, k, v):
    return splash.attend(q, k, v, jnp.asarray(segments), interpret=True)

  tokens = jnp.asarray(segments > 0)[..., None, None]  # padding's outputs are never read
  np.testing.assert_allclose(jnp.where(tokens, kernel(q, k, v), 0), jnp.where(tokens, xla(q, k, v), 0), atol=2e-5)
  w = jnp.asarray(r.standard_normal((B, L, N, H)), jnp.float32) * tokens
  grads = [jax.grad(lambda *x: (f(*x) * w).sum(), argnums=(0, 1, 2))(q, k, v) for f in (xla, kernel)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(b, a, atol=5e-5)


def test_cost_counts_the_causal_blocks():
  # 16 blocks a side: 136 of 256 on or below the diagonal; forward: 2 matmuls of 2 flops a multiply-add
  flops, accessed = splash.cost("fwd", (8, 2048, 128), (8, 2048, 128))
  assert flops == pytest.approx(2 * 2 * 8 * 2048 * 2048 * 128 * 136 / 256)
  assert splash.cost("dkv", (8, 2048, 128), (8, 2048, 128))[0] == pytest.approx(2 * flops)
  assert splash.fits(2048, 128) and not splash.fits(2000, 128) and not splash.fits(2048, 64)
