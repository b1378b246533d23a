"""Train-step speed of jaxft and its peers on the same model, batch, length and optimizer.

  python benchmarks/peers.py [--batch 32] [--length 128] [--steps 6] [--reps 2] [--write]

Contestants (all: MiniLM sequence classification with the checkpoint's CLS-pooler head, AdamW,
dropout on; fp32 on CPU, bf16 compute on GPU):
  hf-flax        the Hugging Face Flax example recipe: FlaxBertForSequenceClassification,
                 jax.jit(value_and_grad) + optax.adamw, donated TrainState
  torch-eager    transformers BertForSequenceClassification + torch.optim.AdamW (needs torch:
  torch-compile  pip install -e '.[bench-torch]'; skipped with a line otherwise)
  jaxft-full     jaxft's train step, nothing frozen
  jaxft-frozen4  jaxft's train step, embeddings and the bottom 4 layers frozen
Repetitions alternate between contestants (A B C A B C ...), each timing `--steps` blocked steps
after one warm-up step; medians over all repetitions are reported, with ratios to jaxft-full.
--write replaces the peers section of benchmarks/RESULTS.md.
"""
import argparse
import platform
import time
from pathlib import Path

import jax
import numpy as np
import optax

from jaxft import assets, bench
from jaxft.config import DEFAULT_MODEL, load_config
from jaxft.step import make_train_step
from jaxft.train import build

LR = 2e-5


def hf_flax(model_dir, batch, dtype):
  """The HF Flax text-classification example's step (run_flax_glue.py), on one device."""
  import jax.numpy as jnp
  import transformers
  from flax.training import train_state
  model = transformers.FlaxBertForSequenceClassification.from_pretrained(model_dir, from_pt=True, num_labels=2,
                                                                         dtype=jnp.dtype(dtype))
  state = train_state.TrainState.create(apply_fn=model.__call__, params=model.params,
                                        tx=optax.adamw(LR, weight_decay=0.01))

  def train_step(state, batch, rng):
    dropout_rng, new_rng = jax.random.split(rng)

    def loss_fn(params):
      logits = state.apply_fn(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], params=params,
                              dropout_rng=dropout_rng, train=True)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss, new_rng

  step = jax.jit(train_step, donate_argnums=(0,))
  carry = [state, jax.random.PRNGKey(0)]

  def run():
    carry[0], loss, carry[1] = step(carry[0], batch, carry[1])
    jax.block_until_ready(loss)
  return run


def jaxft_step(batch, dtype, *overrides):
  cfg = load_config(None, ("model.pooling=head", f"precision.compute={dtype}", "optim.lr=2e-5",
                           "optim.warmup_ratio=0", "optim.schedule=constant", "freeze_embeddings=false",
                           f"train.batch_size={len(batch['labels'])}") + overrides)
  exp = build(cfg, log=lambda *_: None)
  step = jax.jit(make_train_step(exp.model.apply, exp.tx, exp.labels), donate_argnums=0)
  carry = [exp.state]

  def run():
    carry[0], m = step(carry[0], batch)
    jax.block_until_ready(m)
  return run


def torch_step(model_dir, batch, compiled):
  import torch
  import transformers
  model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
  fwd = torch.compile(model) if compiled else model
  tb = {k: torch.from_numpy(np.asarray(batch[k], np.int64)) for k in ("input_ids", "attention_mask",
                                                                       "token_type_ids", "labels")}

  def run():
    opt.zero_grad(set_to_none=True)
    fwd(**tb).loss.backward()
    opt.step()
  return run


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--write", action="store_true")
  args = p.parse_args()
  gpu = jax.default_backend() != "cpu"
  dtype = "bfloat16" if gpu else "float32"
  model_dir = assets.resolve(DEFAULT_MODEL)
  batch = {k: v for k, v in bench.synthetic_batch(args.batch, args.length, 30522, 2).items()
           if k in ("input_ids", "attention_mask", "token_type_ids", "labels", "weights")}

  runners, skipped = {"hf-flax": hf_flax(model_dir, batch, dtype)}, []
  try:
    import torch  # noqa: F401
    runners["torch-eager"] = torch_step(model_dir, batch, compiled=False)
    runners["torch-compile"] = torch_step(model_dir, batch, compiled=True)
  except ImportError:
    skipped.append("torch-eager, torch-compile: skipped, torch is not installed (pip install -e '.[bench-torch]')")
  runners["jaxft-full"] = jaxft_step(batch, dtype)
  runners["jaxft-frozen4"] = jaxft_step(batch, dtype, "freeze_embeddings=true", "freeze_bottom_layers=4")

  times = {name: [] for name in runners}
  for name, run in runners.items():
    run()  # compile / warm up
  for _ in range(args.reps):
    for name, run in runners.items():
      for _ in range(args.steps):
        t = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t)
  peak = bench.matmul_peak(dtype) if not gpu else bench.spec_peak(jax.devices()[0].device_kind, dtype)
  ref = np.median(times["jaxft-full"])
  lines = [f"Machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind} "
           f"({jax.device_count()} device), jax {jax.__version__}; jnp.dot peak {peak / 1e9:,.0f} GFLOP/s ({dtype})",
           f"MiniLM seq-cls, batch {args.batch}, length {args.length}, {dtype}, AdamW, dropout on; "
           f"median of {args.reps} x {args.steps} alternating steps",
           "", "| contestant | ms/step (median) | p10 - p90 | examples/s | its time / jaxft-full time |", "|---|---|---|---|---|"]
  for name, t in times.items():
    t = np.array(t)
    lines.append(f"| {name} | {1000 * np.median(t):,.0f} | {1000 * np.percentile(t, 10):,.0f} - "
                 f"{1000 * np.percentile(t, 90):,.0f} | {args.batch / np.median(t):.1f} | "
                 f"{np.median(t) / ref:.2f}x |")
  lines += [""] + skipped
  text = "\n".join(lines)
  print(text)
  if args.write:
    write_section(Path(__file__).parent / "RESULTS.md", "## Peers: `python benchmarks/peers.py`",
                  f"({time.strftime('%Y-%m-%d')})\n\n{text}\n")


def write_section(path: Path, head: str, body: str) -> None:
  """Replaces the section that starts with `head` (up to the next '## ') in `path`, or appends it."""
  doc = path.read_text()
  start = doc.find(head)
  if start < 0:
    path.write_text(doc.rstrip() + f"\n\n{head} {body}")
    return
  end = doc.find("\n## ", start + len(head))
  path.write_text(doc[:start] + f"{head} {body}" + (doc[end:] if end >= 0 else ""))

if __name__ == "__main__":
  main()
