"""Train-step speed of jaxft's ViT and ResNet modules against transformers' Flax classes (FlaxViTModel,
FlaxResNetModel: what jaxft computed with before issue 33), in one harness: the backbone's pooled output, a
linear head, softmax cross entropy, jax.grad and optax.adamw, jitted with the state donated; random weights
in the published shapes (configs/shapes), float32.

  python benchmarks/vision_peers.py [--models vit-b16,resnet-50] [--batch 8] [--steps 5] [--reps 3]

transformers' Flax classes exist in transformers < 5 only: run this where that is installed (a peers
environment: pip install 'transformers<5'); jaxft alone runs where it is not, with a line saying so.
Repetitions alternate between the two (A B A B ...); the table has each one's median ms per step.
"""
import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft import models
from jaxft.config import ModelConfig

SHAPES = Path(__file__).resolve().parent.parent / "configs" / "shapes"
MODELS = {"vit-b16": "vit-base-patch16-224", "resnet-50": "resnet-50"}
CLASSES = 10


def jaxft_forward(directory: Path):
  """(pooled(params, images) -> [B, D], params) of jaxft's module."""
  bb = models.load(ModelConfig(name=str(directory), weights="random"), seed=0, log=lambda *_: None)
  state = bb.state

  def pooled(params, x_BxHxWx3):
    out, _ = bb.apply(params, {"image": x_BxHxWx3}, True, jax.random.PRNGKey(0), state)
    return out["pooled"]
  return pooled, bb.params, bb.hidden_size


def transformers_forward(directory: Path):
  """The same of transformers' Flax class (NCHW pixels), or None where transformers has none."""
  import transformers
  config = transformers.AutoConfig.from_pretrained(directory)
  cls = getattr(transformers, {"vit": "FlaxViTModel", "resnet": "FlaxResNetModel"}[config.model_type], None)
  if cls is None:
    return None
  model = cls(config, seed=0)
  has_bn = "batch_stats" in model.params

  def pooled(params, x_BxHxWx3):
    x = x_BxHxWx3.astype(jnp.float32).transpose(0, 3, 1, 2) / 255
    if has_bn:
      out, _ = model(x, params=params, train=True)
      return out.pooler_output[:, :, 0, 0]
    return model(x, params=params, train=True, dropout_rng=jax.random.PRNGKey(0)).last_hidden_state[:, 0]
  hidden = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
  return pooled, model.params, hidden


def step_fn(pooled, params, hidden: int):
  """(a jitted train step, its initial state) of backbone + linear head under AdamW."""
  head = {"w": jnp.zeros((hidden, CLASSES)), "b": jnp.zeros((CLASSES,))}
  tx = optax.adamw(1e-4, weight_decay=0.01)
  state = ((params, head), tx.init((params, head)))

  def loss(p, images, labels):
    logits = pooled(p[0], images) @ p[1]["w"] + p[1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(state, images, labels):
    p, opt = state
    grads = jax.grad(loss)(p, images, labels)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt
  return jax.jit(step, donate_argnums=0), state


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="vit-b16,resnet-50")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (args.batch, 224, 224, 3)).astype(np.uint8))
  labels = jnp.asarray(rng.integers(0, CLASSES, args.batch))
  print(f"{platform.processor() or platform.machine()}, {jax.device_count()} device(s), jax {jax.__version__}; "
        f"batch {args.batch} at 224x224, float32, ms per train step (median of {args.reps} x {args.steps} steps)")
  for name in args.models.split(","):
    directory = SHAPES / MODELS[name]
    contestants = {"jaxft": jaxft_forward(directory), "transformers-flax": transformers_forward(directory)}
    if contestants["transformers-flax"] is None:
      print(f"{name}: transformers {__import__('transformers').__version__} has no Flax classes; jaxft only")
      del contestants["transformers-flax"]
    steps = {k: step_fn(*v) for k, v in contestants.items()}
    states, times = {}, {k: [] for k in steps}
    for k, (step, state) in steps.items():
      states[k] = jax.block_until_ready(step(state, images, labels))  # compile
    for _ in range(args.reps):
      for k, (step, _) in steps.items():
        t = time.perf_counter()
        for _ in range(args.steps):
          states[k] = step(states[k], images, labels)
        jax.block_until_ready(states[k])
        times[k].append((time.perf_counter() - t) / args.steps * 1e3)
    row = {k: float(np.median(v)) for k, v in times.items()}
    ratio = f"; transformers-flax / jaxft {row['transformers-flax'] / row['jaxft']:.2f}x" if len(row) > 1 else ""
    print(f"{name}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in row.items()) + ratio)


if __name__ == "__main__":
  main()
