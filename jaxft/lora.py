"""LoRA (Hu et al. 2021): low-rank adapters beside the targeted Dense kernels; the base stays frozen.

Adapters live in the params tree next to their kernel (`.../query/lora_a` [in, r], `lora_b` [r, out]),
so freezing, sharding and checkpoints treat them like any param. The model runs unchanged: in training a
flax method interceptor adds `dropout(x) @ lora_a @ lora_b * alpha / rank` to each targeted Dense call;
in evaluation and generation the adapters are folded into their kernels first (`merge`, as export
does), one matmul per layer instead of three. lora_b starts at zero, so the adapted model starts equal
to the base one.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft import hparams, rules
from jaxft.errors import JaxftError


def is_adapter(path: str) -> bool:
  return re.fullmatch(rules.ADAPTER_RE, path) is not None


PRESETS = ("qv", "attention", "all")  # lora.preset: each family says which it has (its conventions' lora)


def targets(lcfg, conv) -> list[str]:
  """lora.targets, after the model family's preset `lora.preset` (qv | attention | all)."""
  if lcfg.preset and lcfg.preset not in conv.lora:
    raise JaxftError(f"lora.preset={lcfg.preset}: this model family has the presets {', '.join(conv.lora) or 'none'}")
  return list(conv.lora[lcfg.preset] if lcfg.preset else ()) + list(lcfg.targets)


def add_adapters(params, target_rules: list[str], lcfg, seed: int):
  """params plus lora_a / lora_b beside every kernel that `target_rules` match."""
  hits = rules.flat(rules.apply_rules(params, [(t, True) for t in target_rules], default=False,
                                      what="lora target"))
  flat, key = rules.flat(params), jax.random.PRNGKey(seed + 1)
  for i, path in enumerate(p for p, hit in hits.items() if hit):
    kernel = flat[path]
    if not path.endswith("/kernel") or kernel.ndim != 2:
      raise JaxftError(f"lora target {path} {tuple(kernel.shape)} is not a 2-D Dense kernel")
    d_in, d_out = kernel.shape
    module = path[: -len("/kernel")]
    bound = d_in ** -0.5  # PEFT's kaiming-uniform(a=sqrt(5)) bound
    flat[f"{module}/lora_a"] = jax.random.uniform(jax.random.fold_in(key, i), (d_in, lcfg.rank), kernel.dtype,
                                                  -bound, bound)
    flat[f"{module}/lora_b"] = jnp.zeros((lcfg.rank, d_out), kernel.dtype)
  return rules.merge(flat)


def wrap(apply, lcfg):
  """apply(params, batch, train, rng) of the adapted model, for params holding adapters."""

  def lora_apply(params, batch, train=False, rng=None, *rest, **kw):
    scale = hparams.value("lora.alpha", lcfg.alpha) / lcfg.rank  # (a sweep replica's own: hparams.py)
    dropout = hparams.value("lora.dropout", lcfg.dropout)
    if not train and not any(p.endswith("/kernel_q") for p in rules.flat(params)):
      # evaluation and generation: the adapters folded into the kernels once, as export does (not into a
      # quantized base: model.quantize keeps it quantized, and the adapters beside it)
      return apply(merge(params, lcfg), batch, train, rng, *rest, **kw)
    flat = rules.flat(params)
    base = rules.merge({p: x for p, x in flat.items() if not is_adapter(p)})
    modules = sorted({p.rsplit("/", 1)[0] for p in flat if is_adapter(p)})
    used = set()

    def interceptor(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
        return y
      if (m := rules.module_named(modules, context.module.path)) is None:
        return y
      used.add(m)
      x = args[0]
      if train and rng is not None and (hparams.swept("lora.dropout") or lcfg.dropout > 0):
        key = jax.random.fold_in(jax.random.fold_in(rng, 0x10A), modules.index(m))
        keep = jax.random.bernoulli(key, 1 - dropout, x.shape)
        x = jnp.where(keep, x / (1 - dropout), 0)
      a, b = flat[f"{m}/lora_a"].astype(x.dtype), flat[f"{m}/lora_b"].astype(x.dtype)
      return y + ((x @ a) @ b * scale).astype(y.dtype)

    with nn.intercept_methods(interceptor):
      out = apply(base, batch, train, rng, *rest, **kw)
    if (missing := set(modules) - used):
      raise JaxftError(f"lora target {sorted(missing)[0]} is not called as a flax Dense layer")
    return out

  return lora_apply


def merge(params, lcfg):
  """The base params with every adapter folded in: kernel + lora_a @ lora_b * alpha / rank (alpha: a sweep
  replica's own in its hparams.scope)."""
  alpha = hparams.value("lora.alpha", lcfg.alpha)
  flat = rules.flat(params)
  out = {p: x for p, x in flat.items() if not is_adapter(p)}
  for p in flat:
    if p.endswith("/lora_a"):
      module = p[: -len("/lora_a")]
      kernel = out[f"{module}/kernel"]
      delta = flat[p].astype(jnp.float32) @ flat[f"{module}/lora_b"].astype(jnp.float32)
      out[f"{module}/kernel"] = (kernel.astype(jnp.float32) + delta * alpha / lcfg.rank).astype(kernel.dtype)
  return rules.merge(out)
