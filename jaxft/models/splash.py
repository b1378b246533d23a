"""Causal self-attention on TPU with the Pallas splash kernel (jax.experimental.pallas.ops.tpu.splash_attention):
fused, it never materialises the [L, L] scores and skips the blocks that the causal mask and the segment ids
(packed examples, padding) hide. XLA cannot partition a Mosaic kernel, so it runs per shard under shard_map
over the step's mesh: rows over the batch axes, heads over `tensor`. The TPU cost model does not see inside
it; jaxft plan adds its analytic cost (`cost`, from the kernels in the compiled program)."""
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft import parallel

BLOCK = 128  # the kernel's default tile along both sequence axes (BlockSizes.get_default)
# matmuls of [Lq, H] x [H, Lk] size per kernel: forward q.k and p.v; dq recomputes q.k, then do.v and ds.k;
# dkv recomputes q.k, then p.do, do.v and ds.q
MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def fits(length: int, head_dim: int) -> bool:
  """Shapes the kernel tiles: the sequence in whole blocks, a lane-wide head."""
  return length % BLOCK == 0 and head_dim % 128 == 0


def attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL, interpret: bool = False):
  """Causal attention of each token to the earlier ones of its segment (segment ids: packed examples; 0 for
  padding, which only padding sees). GQA: the K key / value heads serve N / K query heads each."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  def per_shard(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL):
    B, L, N, H = q_BxLxNxH.shape
    groups = N // k_BxLxKxH.shape[2]
    kernel = kernels.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((L, L))] * N), head_shards=1,
                                     q_seq_shards=1, interpret=interpret)
    q_BxNxLxH = (q_BxLxNxH * H ** -0.5).transpose(0, 2, 1, 3)
    k_BxNxLxH, v_BxNxLxH = (jnp.repeat(x, groups, axis=2).transpose(0, 2, 1, 3) for x in (k_BxLxKxH, v_BxLxKxH))
    o_BxNxLxH = jax.vmap(kernel)(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH,
                                 segment_ids=kernels.SegmentIds(segments_BxL, segments_BxL))
    return o_BxNxLxH.transpose(0, 2, 1, 3)

  sharding = parallel.batch_sharding()
  if sharding is None:  # outside a step that Parallel compiles: one device
    return per_shard(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL)
  mesh, rows = sharding.mesh, sharding.spec[0]
  tensor = mesh.shape.get("tensor", 1)
  heads = "tensor" if tensor > 1 and k_BxLxKxH.shape[2] % tensor == 0 else None
  spec = P(rows, None, heads, None)
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec,
                       check_vma=False)(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL)


def cost(kernel: str, q_shape, k_shape, itemsize: int = 2) -> tuple[float, float]:
  """(flops, bytes) of one splash kernel call ('fwd', 'dq' or 'dkv') on q [.., N, Lq, H] and k [.., N, Lk, H],
  causal: the blocks on and below the diagonal, (n + 1) / 2n of them for n blocks a side. Bytes: q, the output
  and k / v once, k and v again for each visible block row after the first."""
  *lead, N, Lq, H = q_shape
  Lk = k_shape[-2]
  rows = math.prod(lead) * N
  n = max(1, Lq // BLOCK)
  visible = (n + 1) / (2 * n)
  flops = 2 * MATMULS[kernel] * rows * Lq * Lk * H * visible
  passes = 1 + (n - 1) * visible
  accessed = itemsize * rows * H * (2 * Lq + 2 * Lk * passes)
  return flops, accessed
