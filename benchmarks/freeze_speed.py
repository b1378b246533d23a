"""Step time of full fine-tuning vs frozen bottom layers vs head only vs head only on cached
backbone features (train.cache_features), on the default model.

  python benchmarks/freeze_speed.py [--batch 32] [--length 64] [--steps 12]

Each variant runs the real jaxft train step (jit, donated state) on fixed-shape batches of real
tokenised movie reviews; every step is blocked, the first (compiling) one is not counted.
"""
import argparse
import time

from jaxft import runtime

runtime.tune_malloc()  # as the jaxft command does
import jax  # noqa: E402
import numpy as np

from jaxft.config import load_config
from jaxft.data import batching
from jaxft.experiment import build

VARIANTS = {  # overrides of the default experiment (which freezes the word embeddings)
    "full fine-tune": ("freeze_embeddings=false",),
    "default (embeddings frozen)": (),
    "freeze_bottom_layers=4 (+ embeddings)": ("freeze_bottom_layers=4",),
    "head only": ("train_only=[classifier/.*]",),
    "head only, cached features": ("train_only=[classifier/.*]", "train.cache_features=true"),
}


def time_variant(overrides, batch_size, length, steps):
  exp = build(load_config(None, overrides + (f"train.batch_size={batch_size}",)), log=lambda *_: None)
  src = batching.bucketed(exp.splits["train"], exp.task.collate, batch_size, steps + 1, 0, [length])
  batches = [src[i] for i in range(steps + 1)]
  cached, note = exp.cfg.train.cache_features, ""
  if cached:  # the backbone runs once per example, before training
    features, feats, times = jax.jit(exp.features), [], []
    for b in batches:
      t = time.perf_counter()
      feats.append(jax.block_until_ready(features(exp.initial_state().params, exp.initial_state().model_state, b)))
      times.append(time.perf_counter() - t)
    note = f"the one-time feature pass costs {1000 * np.median(times[1:]):.0f} ms per batch (eval-mode forward)"
    batches = [{"features": f, "labels": b["labels"], "weights": b["weights"]} for f, b in zip(feats, batches)]
  step = jax.jit(exp.train_step(0, cached=cached), donate_argnums=0)
  flops = step.lower(exp.initial_state(), batches[0]).compile().cost_analysis()["flops"]
  state, times = exp.initial_state(), []
  for batch in batches:
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return 1000 * np.median(times[1:]), flops, note


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=64)
  p.add_argument("--steps", type=int, default=12)
  args = p.parse_args()
  print(f"device {jax.devices()[0].device_kind}, batch {args.batch}, length {args.length}, "
        f"median of {args.steps} steps")
  print("| variant | ms/step | examples/s | XLA GFLOP/step | vs full |\n|---|---|---|---|---|")
  base, notes = None, []
  for name, overrides in VARIANTS.items():
    ms, flops, note = time_variant(overrides, args.batch, args.length, args.steps)
    notes += [f"{name}: {note}"] if note else []
    base = base or ms
    print(f"| {name} | {ms:.2f} | {1000 * args.batch / ms:.1f} | {flops / 1e9:.3f} | {ms / base:.4f}x |",
          flush=True)
  print("\n".join(notes))


if __name__ == "__main__":
  main()
