"""The PyTorch path a user would take instead of jaxft for causal-LM fine-tuning, timed beside it: transformers'
LlamaForCausalLM (eager, float32, sdpa attention, torch's threads = this machine's cores) on the same
dequantised weights, the same tokenized examples and the same batches, AdamW:
  padded  rows padded to the batch's longest example (to jaxft's length bucket at or above it), the way
          transformers' collators pad ("longest"): what a PyTorch user gets on a CPU, where transformers'
          packing path (position ids, no mask) needs flash-attention;
  packed  jaxft's packed rows, handed to PyTorch with a 4-D block-diagonal causal mask and per-document
          positions, so that both compute the same thing.
PyTorch computes logits at every position (its loss ignores label -100); jaxft where a token is trained.

  python benchmarks/lm_torch_recipe.py CONFIG [--steps 6] [--warmup 2] [overrides...]

Prints one JSON line per mode and engine with the median step time, tokens/s (all positions), trained
tokens/s and the loss of the first batch (the two engines' must agree). PyTorch runs first, then jaxft
(both at once do not fit 24 GiB); each mode starts from the checkpoint. Needs torch (the bench-torch extra).
"""
import argparse
import json
import os
import time

import numpy as np

from jaxft import runtime

runtime.tune_malloc()  # as the jaxft command does, before jax starts; it serves PyTorch too


def torch_model(exp):
  """transformers' LlamaForCausalLM holding the experiment's (dequantised) weights."""
  import torch
  import transformers

  from jaxft import rules
  from jaxft.models import llama
  flat = llama.to_torch_names({k: np.asarray(v) for k, v in rules.flat(exp.initial_state().params[exp.backbone.key]).items()})
  model = transformers.LlamaForCausalLM(exp.backbone.config)
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in flat.items()}, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model.tie_weights()
  return model.train()


def torch_batch(batch):
  """jaxft's batch -> (input_ids, attention mask (2-D, or 4-D block-diagonal causal for packed rows),
  positions, labels with -100 where no token is trained), as torch tensors."""
  import torch
  ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  labels = np.full(ids.shape, -100, np.int64)  # jaxft's labels are at its logit_positions, or everywhere
  at = batch.get("logit_positions", np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
  np.put_along_axis(labels, at, np.where(batch["weights"] > 0, batch["labels"], -100), axis=1)
  if "segment_ids" in batch:
    seg = batch["segment_ids"]
    L = seg.shape[1]
    visible = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((L, L), bool))
    mask = torch.from_numpy(np.where(visible, 0.0, torch.finfo(torch.float32).min).astype(np.float32))[:, None]
    positions = torch.from_numpy(batch["position_ids"].astype(np.int64))
  else:
    mask = torch.from_numpy(batch["attention_mask"].astype(np.int64))
    positions = None
  return ids, mask, positions, torch.from_numpy(labels.astype(np.int64))


def torch_loss(model, ids, mask, positions, labels):
  import torch
  logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
  return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("config")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  os.environ.setdefault("USE_TORCH", "1")
  import jax
  import torch

  from jaxft.config import load_config
  from jaxft.data import batching
  from jaxft.experiment import PACK_SLOTS, build
  torch.set_num_threads(os.cpu_count())
  cfg = load_config(args.config, tuple(args.overrides))
  exp = build(cfg, log=lambda *_: None)
  ex, bs, L = exp.splits["train"], cfg.train.batch_size, cfg.data.max_length
  rng = np.random.default_rng(0)
  n = args.warmup + args.steps
  plans = [rng.choice(len(ex), bs, replace=False) for _ in range(n)]
  modes = {"padded": [batching.collate(ex, idx, exp.buckets, exp.task.collate) for idx in plans],
           "packed": [batching.collate_packed(ex, idx, exp.task.collate_packed, L, PACK_SLOTS, 2) for idx in plans]}
  # PyTorch first, then jaxft, on the identical batches: both engines' models, optimizer states and
  # float32 logits over the vocabulary do not fit this machine's memory at once.
  times, first = {}, {}
  for mode, batches in modes.items():
    model = torch_model(exp)  # afresh for each mode: both start from the checkpoint
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    with torch.no_grad():
      first[mode, "torch"] = float(torch_loss(model, *torch_batch(batches[0])))
    times[mode, "torch"] = []
    for b in batches:
      t = time.perf_counter()
      opt.zero_grad()
      torch_loss(model, *torch_batch(b)).backward()
      opt.step()
      times[mode, "torch"].append(time.perf_counter() - t)
    del model, opt
  jax_step = jax.jit(exp.train_step(0), donate_argnums=0)
  for mode, batches in modes.items():
    first[mode, "jaxft"] = float(exp.task.loss(exp.apply(exp.initial_state().params, batches[0])[0], batches[0])[0])
    for shape in {b["input_ids"].shape: b for b in batches}.values():  # compile every shape before timing
      jax.block_until_ready(jax_step(jax.tree.map(lambda x: x.copy(), exp.initial_state()), shape))
    state = jax.tree.map(lambda x: x.copy(), exp.initial_state())
    times[mode, "jaxft"] = []
    for b in batches:
      t = time.perf_counter()
      state, m = jax_step(state, b)
      jax.block_until_ready(m)
      times[mode, "jaxft"].append(time.perf_counter() - t)
    del state
  for (mode, engine), ts in times.items():
    batches = modes[mode]
    tokens = float(np.mean([b["input_ids"].size for b in batches[args.warmup:]]))
    trained = float(np.mean([b["weights"].sum() for b in batches[args.warmup:]]))
    med = float(np.median(ts[args.warmup:]))
    print(json.dumps({"mode": mode, "engine": engine, "step_ms": 1000 * med, "rows": int(batches[0]["input_ids"].shape[0]),
                      "tokens_per_s": tokens / med, "trained_tokens_per_s": trained / med, "examples_per_s": bs / med,
                      "first_loss": first[mode, engine]}), flush=True)


if __name__ == "__main__":
  main()
