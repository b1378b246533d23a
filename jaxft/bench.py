"""`jaxft bench`: the real train step of a config, timed: compile time, step-time percentiles,
throughput, FLOPs (XLA's count and the analytic 6N*tokens + attention), MFU and memory.

Every step is blocked before the next starts, so each time is one step's device time plus dispatch;
the host's batch preparation (source + device transfer) is timed separately.
"""
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import chips, parallel, rules
from jaxft.data import batching
from jaxft.experiment import build, setup


def spec_peak(device_kind: str, dtype: str) -> float | None:
  spec = chips.chip(device_kind)
  return spec.peak(dtype) if spec else None


def matmul_peak(dtype: str, n: int | None = None, reps: int = 10) -> float:
  """FLOP/s of a large square jnp.dot on the default device, measured now (median of reps)."""
  n = n or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jnp.ones((n, n), dtype)
  dot = jax.jit(lambda x: x @ x)
  jax.block_until_ready(dot(a))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(dot(a))
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


def synthetic_batch(exp, batch: int, length: int, seed: int = 0) -> dict:
  """A [batch, length] batch of random inputs, nothing padded (the task's `synthetic`), its other fields
  (labels, weights) from real training examples."""
  rng = np.random.default_rng(seed)
  ex = exp.splits["train"]
  out = batching.collate(ex, rng.choice(len(ex), batch, replace=len(ex) < batch), [length], exp.task.collate)
  return exp.task.synthetic(out, rng)


def real_batches(exp, batch: int, length: int, steps: int, rows=slice(None)):
  """Real training batches, all padded to `length` (images: decoded and augmented): (i -> batch i)."""
  return batching.bucketed(exp.splits["train"], exp.task.collate, batch, steps, exp.cfg.seed, [length],
                           lambda n: rows).__getitem__


@dataclasses.dataclass
class Result:
  config: str
  device: str
  devices: int
  dtype: str
  batch_size: int
  length: int
  data: str
  trainable_params: int
  params: int
  compile_s: float
  step_ms_median: float
  step_ms_p10: float
  step_ms_p90: float
  host_ms_median: float
  examples_per_s: float
  tokens_per_s: float
  trained_tokens_per_step: float  # tokens that bear loss (token tasks: weights; padding and prompts excluded)
  trained_tokens_per_s: float
  xla_flops_per_step: float
  analytic_flops_per_step: float
  achieved_flops_per_s: float
  peak_flops_per_s: float
  peak_source: str
  mfu: float
  mfu_trained: float  # MFU counting the FLOPs of loss-bearing tokens only (analytic, per token)
  memory_bytes: int | None
  memory_source: str


def bench(cfg, steps: int = 20, warmup: int = 3, length: int | None = None, data: str = "synthetic",
          name: str = "default", log=print) -> Result:
  """Times phase 0's train step of `cfg` on fixed-shape batches of `length` tokens."""
  length_key = "bench --length" if length else "data.max_length"
  length = length or cfg.data.max_length
  cfg.data.max_length, cfg.data.buckets = length, [length]
  exp = build(cfg, log, length_key=length_key)
  exp.task.require_data_batches("jaxft bench times")
  images = not exp.task.tokens  # an image model: `length` is its resolution
  length = exp.backbone.processor.size if images else length
  tcfg, phase = cfg.train, exp.phases[0]
  par, (target, *_) = setup(exp, log)
  lanes = exp.replicas.lanes  # train.seeds: every replica trains on (here) the same batch in one step
  state = par.put_state(exp.initial_state(), target)
  step = par.compile_train(exp.train_step(0, par.axis_name), target)
  rows = parallel.process_rows(tcfg.batch_size)
  if data == "synthetic":
    host = [{k: v[rows] for k, v in synthetic_batch(exp, tcfg.batch_size, length, i).items()} for i in range(4)]
    made = lambda i: host[i % len(host)]  # noqa: E731
  else:
    made = real_batches(exp, tcfg.batch_size, length, warmup + steps, rows)
  stack = exp.replicas.same_batch

  t0 = time.perf_counter()
  first = par.put_batch(stack(made(0)), train=True)
  compiled, aot = par.ahead_of_time(step, state, first)  # aot None: it compiles in its first call (pmap)
  compile_s = time.perf_counter() - t0
  xla_flops = 0.0
  memory, memory_source = None, "not reported"
  if aot is not None:
    xla_flops = float((aot.cost_analysis() or {}).get("flops", 0.0))
    mem = aot.memory_analysis()
    if mem is not None:
      memory = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes)
      memory_source = "compiled step (arguments + outputs + temporaries)"

  step_times, host_times, trained = [], [], []
  batch = first
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    host_batch = made(i + 1)
    batch = par.put_batch(stack(host_batch), train=True)
    jax.block_until_ready(batch)
    if i + 1 >= warmup:
      trained.append(lanes * exp.task.trained_tokens(host_batch))
    host_times.append(time.perf_counter() - t)
  if aot is None:
    compile_s += step_times[0]  # compiled inside its first step
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    memory, memory_source = int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"

  timed = np.array(step_times[warmup:])
  median = float(np.median(timed))
  dtype = cfg.precision.compute
  kind = jax.devices()[0].device_kind
  peak, peak_source = spec_peak(kind, dtype), "spec sheet"
  if peak is None or jax.default_backend() == "cpu":
    peak, peak_source = matmul_peak(dtype), "jnp.dot measured in this run"
  single = exp.state_shapes(0).params  # one replica's
  params = rules.flat(single)
  n_train = rules.count(rules.split(single, phase.labels, "train")[0])
  analytic = lanes * exp.backbone.train_flops(params, tcfg.batch_size, length, rules.trained(phase.labels))
  flops = xla_flops or analytic
  all_tokens = lanes * tcfg.batch_size * (1 if images else length)
  trained_per_step = float(np.mean(trained)) if trained else float(all_tokens)
  return Result(
      config=name, device=kind, devices=jax.device_count(), dtype=dtype, batch_size=tcfg.batch_size,
      length=length, data=data, trainable_params=n_train, params=rules.count(single),
      compile_s=compile_s, step_ms_median=1000 * median,
      step_ms_p10=1000 * float(np.percentile(timed, 10)), step_ms_p90=1000 * float(np.percentile(timed, 90)),
      host_ms_median=1000 * float(np.median(host_times[warmup:])),
      examples_per_s=lanes * tcfg.batch_size / median,
      tokens_per_s=0.0 if images else lanes * tcfg.batch_size * length / median,
      trained_tokens_per_step=0.0 if images else trained_per_step,
      trained_tokens_per_s=0.0 if images else trained_per_step / median,
      xla_flops_per_step=xla_flops, analytic_flops_per_step=analytic,
      achieved_flops_per_s=flops / median, peak_flops_per_s=peak, peak_source=peak_source,
      mfu=flops / median / peak, mfu_trained=analytic * trained_per_step / all_tokens / median / peak,
      memory_bytes=memory, memory_source=memory_source)


def table(r: Result):
  from rich.table import Table
  image = r.tokens_per_s == 0
  shape = f"{r.length}x{r.length} images" if image else f"{r.length} tokens"
  t = Table(title=f"jaxft bench: {r.config} on {r.devices} x {r.device}, {r.dtype}, batch {r.batch_size} x "
                  f"{shape} ({r.data} data)")
  t.add_column("metric")
  t.add_column("value", justify="right")
  rows = [
      ("trainable / all params", f"{r.trainable_params:,} / {r.params:,}"),
      ("compile", f"{r.compile_s:.1f} s"),
      ("step time median (p10 - p90)", f"{r.step_ms_median:.1f} ms ({r.step_ms_p10:.1f} - {r.step_ms_p90:.1f})"),
      ("host input per step", f"{r.host_ms_median:.1f} ms"),
      ("examples/s", f"{r.examples_per_s:,.1f}"),
      ("tokens/s", "n/a (images)" if image else f"{r.tokens_per_s:,.0f}"),
      ("loss-bearing tokens/step, /s", "n/a (images)" if image else
       f"{r.trained_tokens_per_step:,.0f}, {r.trained_tokens_per_s:,.0f}"),
      ("FLOPs/step: XLA cost analysis", f"{r.xla_flops_per_step / 1e9:,.1f} G"),
      ("FLOPs/step: 3 x forward convolutions" if image else "FLOPs/step: 6N*tokens + attention",
       f"{r.analytic_flops_per_step / 1e9:,.1f} G"),
      ("achieved FLOP/s", f"{r.achieved_flops_per_s / 1e9:,.1f} G"),
      (f"peak FLOP/s ({r.peak_source})", f"{r.peak_flops_per_s / 1e9:,.1f} G"),
      ("MFU", f"{100 * r.mfu:.1f}%"),
      ("MFU of loss-bearing tokens", "n/a (images)" if image else f"{100 * r.mfu_trained:.1f}%"),
      (f"memory ({r.memory_source})", "n/a" if r.memory_bytes is None else f"{r.memory_bytes / 2**20:,.1f} MiB"),
  ]
  for k, v in rows:
    t.add_row(k, v)
  return t


def to_json(r: Result) -> str:
  return json.dumps(dataclasses.asdict(r))
