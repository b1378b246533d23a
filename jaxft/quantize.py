"""QLoRA's frozen base (Dettmers et al. 2023; model.quantize): the backbone's projection kernels kept quantized
in memory and dequantized inside each matmul, while LoRA adapters train at full precision beside them.

A quantized Dense keeps, in place of its `kernel` [in, out]:
  kernel_q      int8 [in, out] (int8, GGUF Q8_0), or uint8 [in / 2, out]: two 4-bit codes a byte (nf4, GGUF
                Q4_0 / Q4_1), block k's bytes holding its values j (low nibble) and j + block / 2 (high), as GGUF
                lays out its blocks, so a GGUF file's blocks are kept byte for byte;
  kernel_scale  float32 [in / block, out]: one scale per block of `block` inputs and output (int8: one block);
  kernel_min    float32 [in / block, out]: Q4_1's block minimum.
model.quantize: int8 (per output channel, absmax / 127), nf4 (blocks of 64: the 16 NormalFloat levels times the
block's absmax), gguf (the GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks, as they are). The kernels quantized are
those of the family's LoRA `all` preset (attention and MLP projections); embeddings, norms and output layer
stay as loaded. The leaves are ordinary params: frozen (a quantized base takes LoRA), checkpointed, sharded.

A flax method interceptor computes each quantized Dense as x @ dequantize(kernel) + bias; the dequantization
sits in a jax.checkpoint, so the backward pass recomputes it rather than keeping a float copy of every
kernel. `dequantized` gives the float kernels back (export, with the adapters then merged).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import rules
from jaxft.errors import JaxftError

KINDS = ("int8", "nf4", "gguf")
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)  # QLoRA's NormalFloat4 levels
NF4_BLOCK = 64
LEAVES = ("kernel_q", "kernel_scale", "kernel_min")


def _blocks(w_IxO, block: int):
  """[in / block, block, out]."""
  d_in, d_out = w_IxO.shape
  if d_in % block:
    raise JaxftError(f"model.quantize: a kernel of {d_in} inputs does not divide into blocks of {block}")
  return w_IxO.reshape(d_in // block, block, d_out)


def pack4(codes_NxBxO):
  """[N, B, O] 4-bit codes -> uint8 [N * B / 2, O]: per block, byte j holds codes j (low) and j + B / 2 (high)."""
  N, B, O = codes_NxBxO.shape
  low, high = codes_NxBxO[:, :B // 2], codes_NxBxO[:, B // 2:]
  return (low.astype(jnp.uint8) | (high.astype(jnp.uint8) << 4)).reshape(N * B // 2, O)


def unpack4(q_HxO, blocks: int):
  """pack4's inverse: uint8 [N * B / 2, O] -> [N, B, O] codes 0..15."""
  q = q_HxO.reshape(blocks, -1, q_HxO.shape[-1])
  return jnp.concatenate([q & 15, q >> 4], axis=1)


def quantize_kernel(w_IxO, kind: str) -> dict:
  """The quantized leaves of a float kernel (gguf: as llama.cpp's Q4_1 would store it)."""
  w_IxO = jnp.asarray(w_IxO, jnp.float32)
  if kind == "int8":
    scale_1xO = jnp.maximum(jnp.abs(w_IxO).max(0, keepdims=True), 1e-12) / 127.0
    return {"kernel_q": jnp.clip(jnp.round(w_IxO / scale_1xO), -127, 127).astype(jnp.int8), "kernel_scale": scale_1xO}
  if kind == "nf4":
    w = _blocks(w_IxO, NF4_BLOCK)
    scale_Nx1xO = jnp.maximum(jnp.abs(w).max(1, keepdims=True), 1e-12)
    codes = jnp.argmin(jnp.abs((w / scale_Nx1xO)[..., None] - NF4), axis=-1)
    return {"kernel_q": pack4(codes), "kernel_scale": scale_Nx1xO[:, 0]}
  w = _blocks(w_IxO, 32)  # Q4_1: x = q * d + m, q in 0..15
  low, high = w.min(1), w.max(1)
  d = jnp.maximum(high - low, 1e-12) / 15.0
  codes = jnp.clip(jnp.round((w - low[:, None]) / d[:, None]), 0, 15)
  return {"kernel_q": pack4(codes), "kernel_scale": d, "kernel_min": low}


def dequantize(leaves: dict, kind: str, dtype=jnp.float32):
  """The float kernel [in, out] of a quantized Dense's leaves."""
  q, scale = leaves["kernel_q"], leaves["kernel_scale"].astype(jnp.float32)
  blocks, d_out = scale.shape
  if q.dtype == jnp.int8:  # int8 per channel, or Q8_0 blocks
    w = q.reshape(blocks, -1, d_out).astype(jnp.float32) * scale[:, None]
  else:
    codes = unpack4(q, blocks)
    if kind == "nf4":
      w = jnp.asarray(NF4)[codes] * scale[:, None]
    elif "kernel_min" in leaves:  # Q4_1
      w = codes.astype(jnp.float32) * scale[:, None] + leaves["kernel_min"].astype(jnp.float32)[:, None]
    else:  # Q4_0
      w = (codes.astype(jnp.float32) - 8.0) * scale[:, None]
  return w.reshape(-1, d_out).astype(dtype)


def target_modules(params, conv) -> list[str]:
  """The Dense modules quantized: those whose kernels the family's LoRA `all` preset names."""
  regexes = conv.lora.get("all")
  if not regexes:
    raise JaxftError("model.quantize: this model family names no projection kernels (no LoRA 'all' preset)")
  hits = rules.flat(rules.apply_rules(params, [(r, True) for r in regexes], default=False, what="quantized kernel"))
  return [p[: -len("/kernel")] for p, hit in hits.items() if hit and p.endswith("/kernel")]


def quantize(params, modules: list[str], kind: str, kept: dict | None = None):
  """params with each module's kernel replaced by its quantized leaves; kept: {module: leaves} read from the
  checkpoint (a GGUF file's own blocks), used as they are."""
  flat = rules.flat(params)
  for m in modules:
    kernel = flat.pop(f"{m}/kernel")
    leaves = (kept or {}).get(m)
    if leaves is None:
      leaves = quantize_kernel(kernel, kind)
    elif tuple(dequantize_shape(leaves)) != tuple(kernel.shape):
      raise JaxftError(f"model.quantize: {m}'s kept blocks are for {dequantize_shape(leaves)}, the model has "
                       f"{tuple(kernel.shape)}")
    flat.update({f"{m}/{k}": jnp.asarray(v) for k, v in leaves.items()})
  return rules.merge(flat)


def dequantize_shape(leaves: dict) -> tuple:
  q = leaves["kernel_q"]
  return (q.shape[0] * (1 if q.dtype == np.int8 else 2), q.shape[1])


def leaves_of(flat: dict, module: str) -> dict:
  """A quantized Dense's leaves {kernel_q, kernel_scale[, kernel_min]} in flat params."""
  return {k: flat[f"{module}/{k}"] for k in LEAVES if f"{module}/{k}" in flat}


def modules_of(flat: dict) -> list[str]:
  return sorted(p[: -len("/kernel_q")] for p in flat if p.endswith("/kernel_q"))


def dequantized(params, kind: str):
  """params with every quantized kernel back in float32 (export; then LoRA merges into it)."""
  flat = rules.flat(params)
  for m in modules_of(flat):
    leaves = leaves_of(flat, m)
    for k in leaves:
      del flat[f"{m}/{k}"]
    flat[f"{m}/kernel"] = np.asarray(dequantize({k: jnp.asarray(v) for k, v in leaves.items()}, kind))
  return rules.merge(flat)


def wrap(apply, kind: str):
  """apply(params, batch, ...) computing each quantized Dense from its quantized leaves."""

  def quantized_apply(params, batch, *rest, **kw):
    flat = rules.flat(params)
    modules = modules_of(flat)
    if not modules:
      return apply(params, batch, *rest, **kw)

    def interceptor(next_fun, args, kwargs, context):
      if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
      m = rules.module_named(modules, context.module.path)
      if m is None:
        return next_fun(*args, **kwargs)
      x = args[0]
      leaves = leaves_of(flat, m)
      y = jax.checkpoint(lambda x, leaves: x @ dequantize(leaves, kind, x.dtype))(x, leaves)
      bias = flat.get(f"{m}/bias")
      return y if bias is None else y + bias.astype(y.dtype)

    with nn.intercept_methods(interceptor):
      return apply(params, batch, *rest, **kw)

  return quantized_apply


def param_bytes(params) -> tuple[int, int]:
  """(bytes of the params as held, bytes were every quantized kernel float32)."""
  flat = rules.flat(params)
  held = sum(x.size * np.dtype(x.dtype).itemsize for x in flat.values())
  floats = held
  for m in modules_of(flat):
    leaves = leaves_of(flat, m)
    floats += 4 * int(np.prod(dequantize_shape(leaves))) - sum(x.size * np.dtype(x.dtype).itemsize
                                                               for x in leaves.values())
  return held, floats
