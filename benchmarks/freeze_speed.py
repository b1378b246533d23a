"""Step time of full fine-tuning vs frozen bottom layers vs head only, on the default model.

  python benchmarks/freeze_speed.py [--batch 32] [--length 64] [--steps 12]

Each variant runs the real jaxft train step (jit, donated state) on fixed-shape batches of real
tokenised movie reviews; every step is blocked, the first (compiling) one is not counted.
"""
import argparse
import time

import jax
import numpy as np

from jaxft.config import load_config
from jaxft.data import pipeline
from jaxft.step import make_train_step
from jaxft.train import build

VARIANTS = {  # overrides of the default experiment (which freezes the word embeddings)
    "full fine-tune": ("freeze_embeddings=false",),
    "default (embeddings frozen)": (),
    "freeze_bottom_layers=4 (+ embeddings)": ("freeze_bottom_layers=4",),
    "head only": ("train_only=[classifier/.*]",),
}


def time_variant(overrides, batch_size, length, steps):
  exp = build(load_config(None, overrides + (f"train.batch_size={batch_size}",)), log=lambda *_: None)
  step = jax.jit(make_train_step(exp.model.apply, exp.tx, exp.labels), donate_argnums=0)
  src = pipeline.TrainBatches(exp.splits["train"], batch_size, steps + 1, 0, [length], 0)
  state, times = exp.state, []
  for i in range(steps + 1):
    batch = src[i]
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  flops = step.lower(state, src[0]).compile().cost_analysis()["flops"]
  return 1000 * np.median(times[1:]), flops


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=64)
  p.add_argument("--steps", type=int, default=12)
  args = p.parse_args()
  print(f"device {jax.devices()[0].device_kind}, batch {args.batch}, length {args.length}, "
        f"median of {args.steps} steps")
  print("| variant | ms/step | examples/s | XLA GFLOP/step | vs full |\n|---|---|---|---|---|")
  base = None
  for name, overrides in VARIANTS.items():
    ms, flops = time_variant(overrides, args.batch, args.length, args.steps)
    base = base or ms
    print(f"| {name} | {ms:.0f} | {1000 * args.batch / ms:.1f} | {flops / 1e9:.1f} | {ms / base:.2f}x |",
          flush=True)


if __name__ == "__main__":
  main()
