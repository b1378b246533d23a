"""Train-step speed of jaxft and its peers on the same model, examples and optimizer; or (--mode e2e) the
wall time of the whole default experiment, jaxft against benchmarks/torch_recipe.py.

  python benchmarks/peers.py [--data synthetic|real] [--batch 32] [--length 128] [--steps 6] [--reps 2] [--write]
  python benchmarks/peers.py --mode e2e [--write]

Contestants (all: MiniLM sequence classification with the checkpoint's CLS-pooler head, AdamW,
dropout on; fp32 on CPU, bf16 compute on GPU):
  hf-flax         the Hugging Face Flax example recipe: FlaxBertForSequenceClassification,
                  jax.jit(value_and_grad) + optax.adamw, donated TrainState (transformers < 5 only: 5 has
                  no Flax classes; skipped with a line there)
  torch-eager     transformers BertForSequenceClassification + torch.optim.AdamW (needs torch:
  torch-compile   pip install -e '.[bench-torch]'; skipped with a line otherwise)
  jaxft-full      jaxft's train step and encoder, nothing frozen
  jaxft-frozen4   jaxft's train step, embeddings and the bottom 4 layers frozen
--data synthetic: every contestant gets the same [batch, length] batch, no padding.
--data real: the first `--steps` batches of the default dataset's training epoch, as jaxft's loader
  draws them (length-sorted windows, then shuffled batches), the same examples for everyone, each engine
  padding them its own way: the HF and PyTorch example scripts pad to --length (their
  max_seq_length), jaxft to its length buckets (up to --length); every shape is compiled before timing.
Repetitions alternate between contestants (A B C A B C ...), each timing `--steps` blocked steps; the
table has medians (synthetic) or means (real: the shapes differ) over all repetitions, with ratios to
jaxft-full. --write replaces the matching peers section of benchmarks/RESULTS.md.
"""
import argparse
import platform
import time
from pathlib import Path

from jaxft import runtime

runtime.tune_malloc()  # as the jaxft command does; in this one process it serves the PyTorch contestants too
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxft import assets, bench  # noqa: E402
from jaxft.config import DEFAULT_MODEL, load_config  # noqa: E402
from jaxft.data import batching  # noqa: E402
from jaxft.experiment import build  # noqa: E402

LR = 2e-5


def hf_flax(model_dir, dtype):
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

  def run(batch):
    carry[0], loss, carry[1] = step(carry[0], batch, carry[1])
    jax.block_until_ready(loss)
  return run


def jaxft_config(batch_size, length, dtype, *overrides):
  buckets = sorted({b for b in (16, 24, 32, 40, 48, 64, 96, 128) if b < length} | {length})
  return load_config(None, ("task.pooling=cls", f"precision.compute={dtype}", f"optim.lr={LR}",
                            "optim.warmup_ratio=0", "optim.schedule=constant", "freeze_embeddings=false",
                            f"train.batch_size={batch_size}", f"data.max_length={length}",
                            f"data.buckets={buckets}") + overrides)


def jaxft_step(exp):
  step = jax.jit(exp.train_step(), donate_argnums=0)
  carry = [exp.initial_state()]

  def run(batch):
    carry[0], m = step(carry[0], batch)
    jax.block_until_ready(m)
  return run


def torch_step(model_dir, compiled):
  import torch
  import transformers
  model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
  fwd = torch.compile(model) if compiled else model

  def run(batch):
    opt.zero_grad(set_to_none=True)
    fwd(**{k: torch.from_numpy(np.asarray(batch[k], np.int64)) for k in TORCH_KEYS}).loss.backward()
    opt.step()
  return run


TORCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def batches(args, exp):
  """{'padded': [batch] * steps at --length for the HF / PyTorch recipes, 'bucketed': the same examples
  in jaxft's length buckets}, and a line saying what they are."""
  keys = TORCH_KEYS + ("weights",)
  if args.data == "synthetic":
    b = bench.synthetic_batch(exp, args.batch, args.length)
    b = {k: v for k, v in b.items() if k in keys}
    return {"padded": [b] * args.steps, "bucketed": [b] * args.steps}, f"length {args.length} (synthetic, no padding)"
  cfg, out = exp.cfg, {}
  for name, buckets in (("padded", [args.length]), ("bucketed", exp.buckets)):
    source = batching.bucketed(exp.splits["train"], exp.task.collate, args.batch, args.steps, cfg.seed, buckets,
                               sort_window=cfg.data.sort_window)
    out[name] = [{k: v for k, v in source[i].items() if k in keys} for i in range(args.steps)]
  lengths = [b["input_ids"].shape[1] for b in out["bucketed"]]
  return out, (f"{args.steps} real training batches ({cfg.data.name}); jaxft's buckets: "
               f"{', '.join(map(str, lengths))} (mean {np.mean(lengths):.0f}); HF and PyTorch pad to {args.length}")


def e2e(write: bool):
  """Wall time of the whole default experiment per engine, each a fresh process run one after the other:
  jaxft with a cold XLA cache, the torch-dynamic recipe (benchmarks/torch_recipe.py), jaxft again with
  the cache the first run filled. Model and data are fetched beforehand (not timed)."""
  import json
  import os
  import subprocess
  import sys
  import tempfile
  root = Path(tempfile.mkdtemp(prefix="jaxft_e2e_"))
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "xla")}
  subprocess.run([sys.executable, "-m", "jaxft.cli", "inspect"], env=env, check=True, capture_output=True)  # fetch
  rows = []

  def jaxft_run(name):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", f"run_dir={root / name}"], env=env,
                       capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    m = [json.loads(line) for line in open(root / name / "metrics.jsonl")]
    train = [x for x in m if x["split"] == "train"]
    step_ms = np.median([x["step_ms"] for x in train[1:]])  # the first window holds the compiles
    acc = float(r.stdout.split("accuracy ")[1].split()[0])
    rows.append((name, wall, f"{step_ms:,.0f} median of {len(train) - 1} log windows", acc))

  jaxft_run("jaxft, cold XLA cache")
  t = time.perf_counter()
  r = subprocess.run([sys.executable, str(Path(__file__).parent / "torch_recipe.py"), "--json"], capture_output=True,
                     text=True, check=True)
  wall, tr = time.perf_counter() - t, json.loads(r.stdout.strip().splitlines()[-1])
  rows.append((f"torch-dynamic (torch {tr['torch']})", wall, f"{tr['step_ms_mean']:,.0f} mean, "
               f"{tr['step_ms_median']:,.0f} median", tr["test_accuracy"]))
  jaxft_run("jaxft, warm XLA cache")
  ref = rows[1][1]
  lines = [f"Machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}; jax "
           f"{jax.__version__}. `jaxft train` with no arguments vs benchmarks/torch_recipe.py (same data, split, "
           "model, hyperparameters), one process each, one after the other",
           "", "| engine | wall time, end to end (s) | x torch-dynamic | step ms | test accuracy |",
           "|---|---|---|---|---|"]
  lines += [f"| {n} | {w:.0f} | {w / ref:.2f}x | {s} | {a:.3f} |" for n, w, s, a in rows]
  text = "\n".join(lines)
  print(text)
  if write:
    write_section(Path(__file__).parent / "RESULTS.md", "## Peers, end to end: `python benchmarks/peers.py --mode e2e`",
                  f"({time.strftime('%Y-%m-%d')})\n\n{text}\n")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--mode", choices=("step", "e2e"), default="step")
  p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--write", action="store_true")
  args = p.parse_args()
  if args.mode == "e2e":
    return e2e(args.write)
  gpu = jax.default_backend() != "cpu"
  dtype = "bfloat16" if gpu else "float32"
  model_dir = assets.resolve(DEFAULT_MODEL)
  quiet = lambda *_: None  # noqa: E731
  full = build(jaxft_config(args.batch, args.length, dtype), log=quiet)
  data, what = batches(args, full)

  runners, skipped = {}, []
  import transformers
  if hasattr(transformers, "FlaxBertForSequenceClassification"):
    runners["hf-flax"] = (hf_flax(model_dir, dtype), "padded")
  else:
    skipped.append(f"hf-flax: skipped, transformers {transformers.__version__} has no Flax classes (a peers "
                   f"environment with transformers<5 runs it)")
  try:
    import torch  # noqa: F401
    runners["torch-eager"] = (torch_step(model_dir, compiled=False), "padded")
    runners["torch-compile"] = (torch_step(model_dir, compiled=True), "padded")
  except ImportError:
    skipped.append("torch-eager, torch-compile: skipped, torch is not installed (pip install -e '.[bench-torch]')")
  runners["jaxft-full"] = (jaxft_step(full), "bucketed")
  frozen = build(jaxft_config(args.batch, args.length, dtype, "freeze_embeddings=true", "freeze_bottom_layers=4"),
                 log=quiet)
  runners["jaxft-frozen4"] = (jaxft_step(frozen), "bucketed")

  times = {name: [] for name in runners}
  for run, kind in runners.values():
    for shape in {b["input_ids"].shape: b for b in data[kind]}.values():
      run(shape)  # compile every shape, warm up
  for _ in range(args.reps):
    for name, (run, kind) in runners.items():
      time.sleep(1)  # let the previous contestant's worker threads (PyTorch's OpenMP pool) go idle
      for b in data[kind]:
        t = time.perf_counter()
        run(b)
        times[name].append(time.perf_counter() - t)
  peak = bench.matmul_peak(dtype) if not gpu else bench.spec_peak(jax.devices()[0].device_kind, dtype)
  average, avg_name = (np.median, "median") if args.data == "synthetic" else (np.mean, "mean")
  ref = average(times["jaxft-full"])
  versions = f"jax {jax.__version__}" + (f", torch {torch.__version__}" if not skipped else "")
  lines = [f"Machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind} "
           f"({jax.device_count()} device), {versions}; jnp.dot peak {peak / 1e9:,.0f} GFLOP/s ({dtype})",
           f"MiniLM seq-cls, batch {args.batch}, {what}; {dtype}, AdamW, dropout on; "
           f"{avg_name} of {args.reps} x {args.steps} alternating steps",
           "", f"| contestant | ms/step ({avg_name}) | p10 - p90 | examples/s | jaxft-full speedup over it |",
           "|---|---|---|---|---|"]
  for name, t in times.items():
    t = np.array(t)
    lines.append(f"| {name} | {1000 * average(t):,.0f} | {1000 * np.percentile(t, 10):,.0f} - "
                 f"{1000 * np.percentile(t, 90):,.0f} | {args.batch / average(t):.1f} | {average(t) / ref:.2f}x |")
  lines += [""] + skipped
  text = "\n".join(lines)
  print(text)
  if args.write:
    write_section(Path(__file__).parent / "RESULTS.md", f"## Peers, {args.data} batches: `python benchmarks/peers.py "
                  f"--data {args.data}`", f"({time.strftime('%Y-%m-%d')})\n\n{text}\n")


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
