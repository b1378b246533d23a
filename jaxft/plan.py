"""`jaxft plan CONFIG --topology v5p:4x4x4`: the config's real programs compiled ahead of time for a TPU
topology, on any machine (no TPU, no weights), and what the TPU compiler says of them.

libtpu (the `tpu` extra) compiles for compile-only TPU devices (jax.experimental.topologies). The experiment
is built with model.weights=shapes (params are ShapeDtypeStructs from the model's config, so a 70B model
plans on a laptop) and meshed as `jaxft train` meshes it; then every program the run compiles is lowered
with abstract, sharded arguments and compiled: each phase's train step at every batch shape the run's data
gives it (length buckets or packed row counts), a cached phase's feature pass, the eval step, and a causal
LM's generation loop.

Per chip: memory (params, optimizer state, the rest, the peak) against the chip's HBM (chips.py). And, as
ESTIMATES, never measurements: the step time, which is the compiler's own (cost_analysis `optimal_seconds`)
where that is valid, else a roofline max(flops / peak FLOP/s, bytes accessed / HBM bandwidth) from the
compiler's counts (every figure names its source); examples and trained tokens per second per chip; MFU
(model FLOPs: 6 x matmul params per token, 4 for frozen ones, plus attention, over the chip's bf16 peak); collectives by kind.
"""
import collections
import copy
import dataclasses
import functools
import json
import math
import os
import re
import time

import jax
import numpy as np

from jaxft import chips as chips_lib
from jaxft import replicas, rules, runtime
from jaxft.data import batching
from jaxft.errors import JaxftError


@dataclasses.dataclass
class Program:
  """One compiled program and the compiler's figures for it (bytes per chip; times per call, estimated)."""
  name: str  # "train" (several phases: "train PHASE"), "features PHASE", "eval", "generate"
  shape: str  # its batch, e.g. "32 x 64" (rows x tokens)
  calls: int  # how many times the run calls it (train: steps; eval: batches of one validation pass)
  compile_s: float
  params_bytes: int  # the state's params on one chip (sharded as the run shards them)
  opt_bytes: int  # optimizer state (and the rest of the train state) on one chip
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written into donated arguments
  temp_bytes: int
  code_bytes: int
  peak_bytes: int  # arguments + outputs - aliased + temporaries + code
  flops: float  # per chip, as the compiler counts them (and the kernels it cannot see, counted analytically)
  bytes_accessed: float
  compiler_s: float | None  # cost_analysis' optimal_seconds, as reported (None: absent)
  estimate_s: float  # the step time used: the compiler's, or the roofline where that is invalid
  estimate_source: str  # "compiler" | "roofline (...why...)"
  collectives: dict  # kind -> [count, result bytes], per call (while loops counted by their trip count)
  examples: int = 0  # per call (train)
  tokens: int = 0
  trained_tokens: float = 0.0
  model_flops: float = 0.0  # all chips together: (4N + 2N_trained) x tokens + attention (or 3 x forward for images)
  kernels: dict = dataclasses.field(default_factory=dict)  # kernel -> [calls, flops, bytes], counted analytically


@dataclasses.dataclass
class Plan:
  config: str
  topology: str
  slices: int
  chip: str
  chips: int
  hbm_bytes: int
  peak_flops: float  # bf16, per chip
  chip_source: str
  mesh: dict
  batch_size: int
  compute_dtype: str
  programs: list
  peak_bytes: int  # the largest program's, per chip
  fits: bool
  step_s: float  # ESTIMATE: the run's mean train step (its programs weighted by their steps)
  step_source: str
  examples_per_s_per_chip: float  # ESTIMATE
  trained_tokens_per_s_per_chip: float  # ESTIMATE (0 for images)
  mfu: float  # ESTIMATE: model FLOPs / (step_s x chips x bf16 peak)
  compile_s: float
  notes: list
  # Feeding the chips: every host makes each whole global batch (and feeds its rows of it)
  host_workers: int = 0  # data.workers (threads making batches)
  host_examples_per_s: float = 0.0  # MEASURED on this machine: the training batches' pipeline, no model
  appetite_examples_per_s: float = 0.0  # ESTIMATE: what the chips take (global batch / estimated step)
  bottleneck: str = ""  # "chips" | "host input (measured here ...)"


class DoesNotFit(JaxftError):
  """A program needs more HBM than a chip has (the compiler refused it, or its peak exceeds the chip's)."""


# ---- compile-only TPU devices --------------------------------------------------------------------------------


def wraparound(dims: list[int]) -> tuple[bool, bool, bool]:
  """Which axes of a slice close into a ring (torus links), as Google builds them: a v4 / v5p slice whose
  every side is a multiple of 4 (4x4x4 and up, full cubes) on all three; a v5e / v6e slice on a side of 16
  (its whole pod). libtpu lowers collectives for the links it is told of: without them, a 64-chip slice's FSDP
  gathers compile as all-reduces (twice the traffic), which is not what that slice runs."""
  if len(dims) == 3:
    return (all(d % 4 == 0 for d in dims),) * 3
  return tuple(d == 16 for d in dims) + (False,) * (3 - len(dims))


def devices(topology: str, slices: int = 1) -> list:
  """The compile-only devices of a TPU topology ('v5e:2x2', 'v5p:4x4x4', 'v6e:16x16', 'v4:2x2x1'), times
  `slices` joined by the data-centre network."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise JaxftError("jaxft plan compiles with libtpu, which is not installed: pip install 'jaxft[tpu]' "
                     "(the TPU compiler, ~700 MB; it runs on CPU-only machines)") from None
  from jax.experimental import topologies
  kwargs = {"num_slices": slices} if slices > 1 else {}
  if topology.startswith("v4"):  # one device per chip, as TPU v4 VMs run it (otherwise one per TensorCore)
    kwargs["chip_config_name"] = "megacore"
  dims = re.fullmatch(r"v\w+:(\d+(?:x\d+)*)", topology)
  if dims:
    sides = [int(d) for d in dims.group(1).split("x")]
    kwargs["wrap"] = wraparound(sides)
    if math.prod(sides) < 4:  # less than a host: say its bounds
      kwargs["chips_per_host_bounds"] = tuple(sides + [1] * (3 - len(sides)))
  try:
    with runtime.libtpu_compile_only():
      return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
  except Exception as e:  # noqa: BLE001 (libtpu raises its runtime's error types)
    raise JaxftError(f"--topology {topology!r}: {str(e).splitlines()[0]} (names look like v5e:2x2, v5p:4x4x4, "
                     "v6e:16x16, v4:2x2x1)") from None


# ---- what the compiler says --------------------------------------------------------------------------------

_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|ragged-all-to-all|collective-permute)"
                         r"(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8\w*)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def _array_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype)[:2] or 8)
    out.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
  return out


@functools.lru_cache(maxsize=2)  # collectives and kernels read the same program
def _computations(hlo: str) -> dict:
  """{name: {"entry": bool, "lines": [instructions]}} of an HLO module's text (an instruction whose attributes
  run over several lines, as a kernel's metadata does, joined into one)."""
  comps, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      current = comps.setdefault(head.group(2), {"entry": bool(head.group(1)), "lines": []})
    elif line.rstrip() == "}":
      current = None
    elif current is not None and re.match(r"\s+(ROOT )?%?[\w.\-]+ = ", line):
      current["lines"].append(line)
    elif current is not None and current["lines"]:
      current["lines"][-1] += line
  return comps


def _executed(comps: dict, leaf):
  """Calls leaf(name, right-hand side, times) for each instruction one call of the module runs: the entry
  computation's and, through calls and conditionals, what they call; a while loop's body by its trip count.
  leaf returns True where it accounted for the instruction (a fusion is not looked into)."""
  def visit(name, times, depth=0):
    for line in comps.get(name, {}).get("lines", ()) if depth < 20 else ():
      lhs, rhs = line.split(" = ", 1)
      if leaf(lhs.strip().lstrip("%"), rhs, times):
        continue
      if " while(" in rhs:
        body = re.search(r"body=%([\w.\-]+)", rhs)
        if body:
          visit(body.group(1), times * _trips(comps, rhs), depth + 1)
      elif " call(" in rhs or " conditional(" in rhs:
        for called in re.findall(r"(?:to_apply|branch_computations=\{|calls)=?%([\w.\-]+)", rhs):
          visit(called, times, depth + 1)

  for name, comp in comps.items():
    if comp["entry"]:
      visit(name, 1)


def _trips(comps: dict, rhs: str) -> int:
  """A while loop's trip count: its known_trip_count, else the bound of a condition `i < N` (jax's loops count
  from 0 by 1), else 1."""
  if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', rhs):
    return int(known.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", rhs)
  lines = comps.get(cond.group(1), {}).get("lines", []) if cond else []
  root = next((line for line in lines if line.lstrip().startswith("ROOT ")), "")
  bound = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", root)
  for line in lines if bound else ():
    if m := re.match(rf"\s*%{re.escape(bound.group(1))} = s32\[\]\S* constant\((\d+)\)", line):
      return int(m.group(1))
  return 1


def collectives(hlo: str) -> dict:
  """{kind: [count, result bytes]} of the collectives one call of a compiled module runs (while loops by
  their trip count); a fusion that wraps one counts as that one (libtpu fuses reduce-scatters as
  'all-reduce-scatter' fusions). libtpu lowers some all-gathers (FSDP's weight gathers over a torus) as an
  all-reduce of the shard written into zeros: those count as 'all-gather (as all-reduce)'."""
  comps = _computations(hlo)
  defined = {line.split(" = ", 1)[0].split()[-1].lstrip("%"): line.split(" = ", 1)[1]
             for comp in comps.values() for line in comp["lines"]}
  totals = collections.defaultdict(lambda: [0, 0])

  def inner_kind(name):  # the collective a fused computation holds
    if "reduce-scatter" in name:
      return "reduce-scatter"
    for line in comps.get(name, {}).get("lines", ()):
      if m := _COLLECTIVE.search(line.split(" = ", 1)[1]):
        return m.group(1)
    return None

  def zero_padded(operand, depth=0):  # a dynamic-update-slice, or a fusion whose root is one (through copies)
    rhs = defined.get(operand, "")
    if depth < 4 and (moved := re.search(r"\s(?:copy-done|copy-start|copy|bitcast)\(%([\w.\-]+)\)", rhs)):
      return zero_padded(moved.group(1), depth + 1)
    if called := re.search(r" fusion\(.*calls=%([\w.\-]+)", rhs):
      rhs = next((line for line in comps.get(called.group(1), {}).get("lines", ()) if "ROOT " in line), "")
    return re.search(r"\sdynamic-update-slice\(", rhs) is not None

  def leaf(_, rhs, times):
    result = rhs.split("(", 1)[0] if not rhs.startswith("(") else rhs[:rhs.index(")") + 1]
    if m := _COLLECTIVE.search(rhs):
      sizes = _array_bytes(rhs[:m.start()])
      kind = m.group(1)
      operands = re.findall(r"%([\w.\-]+)", rhs[m.end():rhs.index(")", m.end())])
      if kind == "all-reduce" and operands and all(map(zero_padded, operands)):
        kind = "all-gather (as all-reduce)"
      totals[kind][0] += times
      totals[kind][1] += times * (max(sizes) if m.group(2) else sum(sizes)) if sizes else 0
      return True
    if " fusion(" in rhs and (called := re.search(r"calls=%([\w.\-]+)", rhs)):
      if kind := inner_kind(called.group(1)):
        totals[kind][0] += times
        totals[kind][1] += times * sum(_array_bytes(result))
      return True
    return False

  _executed(comps, leaf)
  return {k: v for k, v in sorted(totals.items())}


def kernels(hlo: str) -> dict:
  """{kernel: [calls, flops, bytes]} of the Mosaic kernels one call of a compiled module runs whose cost jaxft
  knows (the splash attention's fwd, dq and dkv; models/splash.py), counted from their operand shapes: the TPU
  cost model does not see inside a kernel."""
  from jaxft.models import splash
  totals = collections.defaultdict(lambda: [0, 0.0, 0.0])

  def leaf(name, rhs, times):
    if 'custom_call_target="tpu_custom_call"' not in rhs:
      return False
    kind = re.search(r"splash_m[hq]a_(fwd|dq|dkv)", name)  # mha (jaxft's) or mqa
    layout = re.search(r"operand_layout_constraints=\{(.*?)\}, \w+=", rhs)
    if kind and layout:
      (dtype, q), (_, k) = [(dtype, [int(d) for d in dims.split(",")]) for dtype, dims in _ARRAY.findall(
          layout.group(1)) if dtype in ("bf16", "f32") and dims.count(",") >= 2][:2]  # the mask tables are s8
      flops, accessed = splash.cost(kind.group(1), q, k, 2 if dtype == "bf16" else 4)
      for i, x in enumerate((1, flops, accessed)):
        totals[kind.group(1)][i] += times * x
    return True

  _executed(_computations(hlo), leaf)
  return {k: v for k, v in sorted(totals.items())}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis() or {}
  return dict(cost[0] if isinstance(cost, (list, tuple)) else cost)


class _Loops:
  """The whole cost of programs with loops: the TPU cost model counts a while loop's body once, so a step
  that scans its blocks (model.scan_layers, L of them) or its micro-batches (train.micro_batch_size, k of them)
  reports the cost of one block or micro-batch plus the rest. The same program compiled without those loops
  at 1 and 2 blocks (and 1 and 2 micro-batches) gives the rest and one of each; the whole step's cost is
  extrapolated to L blocks and k micro-batches (bilinearly where both loop). Memory stays the program's own."""

  def __init__(self, cfg, devs, slices: int, layers: int | None, micro_steps: int):
    self.cfg, self.devs, self.slices, self.built = cfg, devs, slices, {}
    self.layers, self.micro = layers, micro_steps

  def _program(self, depth, micro, kind: str, k: int):
    key = (depth, micro if kind == "train" else None)
    if key not in self.built:
      from jaxft import config as config_lib
      from jaxft.experiment import build, setup
      overrides = [f"model.layers={depth}", "model.scan_layers=false"] if depth else []
      if key[1]:  # m micro-batches' rows in one batch, without accumulation (no loop)
        overrides += [f"train.batch_size={micro * self.cfg.train.micro_batch_size}", "train.micro_batch_size=null"]
      quiet = lambda *a, **kw: None  # noqa: E731
      loop_cfg = config_lib.override(self.cfg, overrides)
      if depth:  # the scanned body differentiates every block, frozen ones too: each costs a trainable block
        loop_cfg.freeze_bottom_layers = 0
        loop_cfg.phases = [{**ph, "freeze_bottom_layers": 0} if "freeze_bottom_layers" in ph else ph
                           for ph in loop_cfg.phases]
      exp = build(loop_cfg, quiet, platform=self.devs[0].platform)
      self.built[key] = (exp, *setup(exp, quiet, self.devs, self.slices))
    exp, par, targets = self.built[key]
    target = targets[k]
    if kind == "train":
      return par.compile_train(exp.train_step(k, cached=exp.phases[k].cfg.train.cache_features), target), target
    return par.compile_eval(exp.eval_step(), target), target

  def _batch(self, batch, micro):
    """The run's batch cut to `micro` of its micro-batches (rows; a replicated run's second axis)."""
    if not micro:
      return batch
    axis = 1 if replicas.vectorised(self.cfg) else 0  # [R, B, ...]

    def cut(x):
      shape = list(x.shape)
      shape[axis] = shape[axis] * micro // self.micro
      return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=x.sharding)
    return {key: cut(x) for key, x in batch.items()}

  def cost(self, kind: str, k: int, batch) -> tuple[dict, str]:
    depths = (1, 2) if self.layers else (None,)
    micros = (1, 2) if self.micro > 1 and kind == "train" else (None,)
    c = {}
    for d in depths:
      for m in micros:
        step, target = self._program(d, m, kind, k)
        b = self._batch(batch, m)
        c[d, m] = _cost(step.lower(*((target, b) if kind == "train" else (target.params, target.model_state, b)))
                        .compile())
    L, K = (self.layers or 1) - 1, (self.micro if micros[0] else 1) - 1
    d0, m0 = depths[0], micros[0]
    d1, m1 = depths[-1], micros[-1]

    def whole(key):
      if any(key not in x for x in c.values()):
        return None
      v = lambda d, m: c[d, m][key]  # noqa: E731
      return (v(d0, m0) + L * (v(d1, m0) - v(d0, m0)) + K * (v(d0, m1) - v(d0, m0))
              + L * K * (v(d1, m1) - v(d1, m0) - v(d0, m1) + v(d0, m0)))
    out = {key: whole(key) for key in ("flops", "bytes accessed")}
    if all(x.get("optimal_seconds", -1) > 0 for x in c.values()):
      out["optimal_seconds"] = whole("optimal_seconds")
    how = [f"{self.layers} scanned blocks" if self.layers else "", f"{self.micro} micro-batches" if K else ""]
    return out, f", extrapolated to {' x '.join(h for h in how if h)} from compiles of 1 and 2"


def _chip_bytes(tree) -> int:
  """Bytes of one chip's shards of a tree of sharded ShapeDtypeStructs."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _abstract(batch: dict, sharding) -> dict:
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=sharding) for k, v in batch.items()}


def _shape(batch: dict) -> str:
  x = batch.get("input_ids", batch.get("image", next(iter(batch.values()))))
  return " x ".join(map(str, np.shape(x)))


def _suggest(cfg, state_bytes: int, hbm: int) -> str:
  """What would make a program fit, as overrides to try (`jaxft plan --search` tries them)."""
  tries = []
  if cfg.parallel.mesh.fsdp == 1 and state_bytes > hbm / 4:
    tries.append("parallel.mesh.fsdp=-1 parallel.mesh.data=1 (shard params and optimizer state)")
  if cfg.model.remat == "none":
    tries.append("model.remat=block")
  micro = cfg.train.micro_batch_size or cfg.train.batch_size
  if micro > 1:
    tries.append(f"train.micro_batch_size={max(1, micro // 2)}")
  if cfg.precision.compute == "float32":
    tries.append("precision.compute=bfloat16")
  if not cfg.lora.targets and not cfg.lora.preset:
    tries.append("lora.preset=qv (adapters only: no optimizer state for the base)")
  return "; try " + ", or ".join(tries) if tries else ""


class _Compiler:
  """Compiles programs for the plan's chips and reads the compiler's figures off each."""

  def __init__(self, cfg, spec, log, task):
    self.cfg, self.spec, self.log, self.task, self.programs = cfg, spec, log, task, []

  def __call__(self, name, lower, calls, state=None, batch=None, model_flops=0.0, shape="", whole_cost=None
               ) -> Program:
    """lower(): the program lowered with abstract arguments; batch: a real batch of its shape; whole_cost():
    the program's (cost analysis, how it was found) where the compiled program's own undercounts it."""
    shape = shape or _shape(batch)
    t = time.perf_counter()
    params, opt = (_chip_bytes(state.params), _chip_bytes(state.replace(params={}))) if state is not None else (0, 0)
    try:
      compiled = lower().compile()
    except Exception as e:  # noqa: BLE001 (the runtime's error type)
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      why = next((line.strip().rstrip(".") for line in str(e).splitlines() if "HBM" in line or "memory" in line.lower()),
                 str(e).splitlines()[0])
      raise DoesNotFit(f"{name} [{shape}] does not fit a {self.spec.name} chip ({_gib(self.spec.hbm_bytes)} HBM): "
                       f"{why[:300]}; per chip: params {_gib(params)}, optimizer state {_gib(opt)}"
                       + _suggest(self.cfg, params + opt, self.spec.hbm_bytes)) from None
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    peak = getattr(mem, "peak_memory_in_bytes", 0) or (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                       - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    peak += mem.generated_code_size_in_bytes
    cost, how = whole_cost() if whole_cost else (_cost(compiled), "")
    hlo = compiled.as_text()
    # the kernels the cost model cannot see into, counted analytically and added (each at its roofline)
    fused = kernels(hlo)
    kernel_s = sum(max(f / self.spec.bf16_flops, b / self.spec.hbm_bytes_per_s) for _, f, b in fused.values())
    flops = float(cost.get("flops", 0.0)) + sum(f for _, f, _ in fused.values())
    accessed = float(cost.get("bytes accessed", 0.0)) + sum(b for _, _, b in fused.values())
    reported = cost.get("optimal_seconds")
    roofline = max(flops / self.spec.bf16_flops, accessed / self.spec.hbm_bytes_per_s)
    if reported is not None and math.isfinite(reported) and reported > 0 and reported + kernel_s >= roofline / 2:
      estimate, source = float(reported) + kernel_s, "compiler"
    else:
      why = ("absent" if reported is None else f"{reported:.3g} s is below the roofline bound" if reported > 0
             else f"{reported:.3g} s")
      estimate, source = roofline, f"roofline (compiler estimate {why})"
    source += how
    if fused:
      source += (f", with {sum(c for c, _, _ in fused.values()):,} splash attention kernel calls counted "
                 f"analytically (~{1000 * kernel_s:.3g} ms at their roofline)")
    examples = tokens = trained = 0
    if batch is not None:
      examples = int((np.asarray(batch["index"]) >= 0).sum()) if "index" in batch else 0
      if "input_ids" in batch:
        tokens = int(np.size(batch["input_ids"]))
        trained = self.task.trained_tokens(batch)
    program = Program(name, shape, calls, compile_s, params, opt, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                      mem.alias_size_in_bytes, mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, peak, flops,
                      accessed, None if reported is None else float(reported), estimate, source,
                      collectives(hlo), examples, tokens, trained, model_flops, fused)
    self.log(f"  {name} [{shape}] x{calls}: peak {_gib(peak)} per chip, {flops / 1e9:,.1f} GFLOP, "
             f"~{1000 * estimate:.3g} ms ({source.split(' (')[0].split(',')[0]} estimate), compiled in {compile_s:.1f} s")
    if peak > self.spec.hbm_bytes:
      raise DoesNotFit(f"{name} [{shape}] does not fit a {self.spec.name} chip: its peak is {_gib(peak)} per chip, "
                       f"the chip has {_gib(self.spec.hbm_bytes)} (params {_gib(params)}, optimizer state "
                       f"{_gib(opt)}, temporaries {_gib(mem.temp_size_in_bytes)})"
                       + _suggest(self.cfg, params + opt, self.spec.hbm_bytes))
    self.programs.append(program)
    return program


def _gib(n) -> str:
  return f"{n / 2 ** 30:,.2f} GiB" if n >= 2 ** 26 else f"{n / 2 ** 20:,.1f} MiB"


# ---- the run's programs ----------------------------------------------------------------------------------------


def _train_sources(exp, shards: int):
  """(the run's training batches, as `jaxft train` feeds them; each replica's data order)."""
  source = exp.replicas.batches(lambda seed: exp.train_batches(shards, seed=seed))
  return source, exp.replicas.sources(source)


def _train_shapes(exp, sources, shards: int, start: int, stop: int) -> dict:
  """{batch length (rows or bucket): (steps, first step)} of training steps [start, stop) (replicas: their
  common, padded shape)."""
  out = {}
  for i in range(start, stop):
    n = max(exp.batch_length(src.indices(i), shards) for src in sources)
    count, first = out.get(n, (0, i))
    out[n] = (count + 1, first)
  return out


def _eval_shapes(exp, split: str):
  """{shape: (batches, a batch)} of one pass over a split's evaluation batches."""
  out = {}
  for b in exp.eval_batches(split):
    key = tuple(np.shape(v) for v in b.values())
    count, first = out.get(key, (0, b))
    out[key] = (count + 1, first)
  return out


def _model_flops(exp, k: int, batch) -> float:
  """The analytic FLOPs of phase k's step on `batch` ([lanes..., B, L] tokens, or [lanes..., B, H, W, 3]
  images; 0 for a batch without inputs: cached features)."""
  x = batch.get("input_ids" if exp.task.tokens else "image")
  if x is None:
    return 0.0
  shape = np.shape(x) if exp.task.tokens else np.shape(x)[:-3] + (1,)  # [lanes..., B, L]
  return math.prod(shape[:-2]) * exp.backbone.train_flops(rules.flat(exp.state_shapes(k).params), shape[-2],
                                                           shape[-1], rules.trained(exp.phases[k].labels))


def plan(cfg, topology: str, slices: int = 1, log=print, quick: bool = False) -> Plan:
  """Compiles every program `jaxft train` would run with `cfg` for `slices` x `topology` TPU chips.
  quick: only each phase's largest train batch (what --search compares); no eval, no generation."""
  from jaxft.experiment import build, setup
  if cfg.parallel.backend != "jit":
    raise JaxftError("jaxft plan compiles the jit backend (parallel.backend=jit): a pmap program is one "
                     "device's, with no sharding to plan")
  devs = devices(topology, slices)
  spec = chips_lib.chip(devs[0].device_kind)
  if spec is None:
    raise JaxftError(f"--topology {topology}: no spec for {devs[0].device_kind!r} chips in jaxft/chips.py")
  cfg = copy.deepcopy(cfg)
  cfg.model.weights = "shapes"
  t0 = time.perf_counter()
  exp = build(cfg, log, platform=devs[0].platform)
  exp.task.require_data_batches("jaxft plan compiles")
  log(f"plan: {slices} x {topology}, {len(devs)} {spec.name} chips")
  par, targets = setup(exp, log, devs, slices)
  source, sources = _train_sources(exp, par.batch_shards)
  compiler, notes = _Compiler(cfg, spec, log, exp.task), []
  loops = (_Loops(cfg, devs, slices, exp.backbone.num_layers if cfg.model.scan_layers else None, exp.micro_steps)
           if cfg.model.scan_layers or exp.micro_steps > 1 else None)
  if exp.replicas.chunk:
    notes.append("train.replica_chunk loops over the replicas: the compiler counts that loop's body once, so the "
                 "train step's estimate is low")
  start, train = 0, []
  for k, (phase, target) in enumerate(zip(exp.phases, targets)):
    cached = phase.cfg.train.cache_features
    step = par.compile_train(exp.train_step(k, cached=cached), target)
    by_length = _train_shapes(exp, sources, par.batch_shards, start, start + phase.max_steps)
    transform = _cached_transform(exp, par, target, compiler, k) if cached else (lambda b: b)
    if phase.until:
      notes.append(f"phase {phase.name} ends on a plateau: planned for its most steps, {phase.max_steps}")
    if quick:  # the largest batch stands for all of the phase's steps
      by_length = {max(by_length): (sum(c for c, _ in by_length.values()), by_length[max(by_length)][1])}
      notes.append(f"quick plan: phase {phase.name}'s largest batch only, standing for all its steps")
    for _, (count, first) in sorted(by_length.items()):
      batch = transform(source[first])
      flops = _model_flops(exp, k, batch) if not cached else 0.0
      abstract = _abstract(batch, par.train_batch_sharding)
      name = "train" if len(exp.phases) == 1 else f"train {phase.name}"
      cost = (lambda: loops.cost("train", k, abstract)) if loops else None
      train.append(compiler(name, lambda: step.lower(target, abstract), count, target, batch, flops,
                            whole_cost=cost))
    start += phase.max_steps

  eval_step = par.compile_eval(exp.eval_step(), targets[0])
  for _, (count, batch) in () if quick else _eval_shapes(exp, "validation").items():
    args = (targets[0].params, targets[0].model_state, _abstract(batch, par.batch_sharding))
    cost = (lambda: loops.cost("eval", 0, args[2])) if loops and cfg.model.scan_layers else None
    compiler("eval", lambda: eval_step.lower(*args), count, batch=batch, whole_cost=cost)
  if not quick and (exp.task.generates or exp.backbone.new_cache is not None):
    _plan_generate(exp, par, targets[-1], compiler)

  steps = sum(p.calls for p in train)
  step_s = sum(p.calls * p.estimate_s for p in train) / steps
  workers = batching.workers(cfg.data.workers)
  host = 0.0 if quick else _host_pipeline(source, workers)
  sources = sorted({p.estimate_source.split(" (")[0].split(",")[0] for p in train})
  n, peak = len(devs), max(p.peak_bytes for p in compiler.programs)
  model_flops = sum(p.calls * p.model_flops for p in train) / steps
  examples = cfg.train.batch_size * exp.replicas.lanes
  trained = sum(p.calls * p.trained_tokens for p in train) / steps
  return Plan(
      config="", topology=topology, slices=slices, chip=spec.name, chips=n, hbm_bytes=spec.hbm_bytes,
      peak_flops=spec.bf16_flops, chip_source=spec.source, mesh=dict(par.mesh.shape), batch_size=cfg.train.batch_size,
      compute_dtype=cfg.precision.compute, programs=compiler.programs, peak_bytes=peak, fits=peak <= spec.hbm_bytes,
      step_s=step_s, step_source=" + ".join(sources), examples_per_s_per_chip=examples / step_s / n,
      trained_tokens_per_s_per_chip=trained / step_s / n, mfu=model_flops / step_s / (n * spec.bf16_flops),
      compile_s=time.perf_counter() - t0, notes=notes, host_workers=workers, host_examples_per_s=host,
      appetite_examples_per_s=examples / step_s,
      bottleneck="" if quick else "chips" if host >= examples / step_s else "host input")


def _host_pipeline(source, workers: int, seconds: float = 5.0) -> float:
  """Examples/s of the training batches' pipeline alone (collate, image decoding and augmentation), as
  `jaxft train` runs it with `workers` threads: timed over up to `seconds` after the first batch."""
  batches = iter(batching.train_dataset(source, workers))
  next(batches)  # the threads started
  t0, examples = time.perf_counter(), 0
  for batch in batches:
    examples += int((np.asarray(batch["index"]) >= 0).sum())  # every replica's
    if time.perf_counter() - t0 > seconds:
      break
  return examples / max(time.perf_counter() - t0, 1e-9)


def _meshes(n: int, batch: int) -> list[tuple]:
  """(data, fsdp, tensor) splits of n chips to try: data parallel, FSDP, FSDP x TP 2 / 4, DP 2 x FSDP."""
  out = [(n, 1, 1), (1, n, 1), (1, n // 2, 2), (1, n // 4, 4), (2, n // 2, 1)]
  return [m for m in dict.fromkeys(out) if math.prod(m) == n and min(m) >= 1 and batch % (m[0] * m[1]) == 0]


def search(cfg, topology: str, slices: int = 1, log=print) -> list:
  """[(overrides, quick Plan or why it does not fit)] over mesh splits x remat x micro-batch size: for each
  mesh, no remat and no accumulation first; where that does not fit, remat, then micro-batches halved until
  something fits. The best fitting one by estimated examples/s comes first."""
  from jaxft import config as config_lib
  n, out = len(devices(topology, slices)), []
  batch = cfg.train.micro_batch_size or cfg.train.batch_size
  for data, fsdp, tensor in _meshes(n, cfg.train.batch_size):
    mesh = [f"parallel.mesh.data={data}", f"parallel.mesh.fsdp={fsdp}", f"parallel.mesh.tensor={tensor}"]
    micro = batch
    while micro % (data * fsdp) == 0 and micro >= data * fsdp:
      fitted = False
      for remat in ("none", "block"):
        overrides = mesh + [f"model.remat={remat}"] + (
            [f"train.micro_batch_size={micro}"] if micro != cfg.train.batch_size else [])
        try:
          p = plan(config_lib.override(cfg, overrides), topology, slices, lambda *a, **k: None, quick=True)
        except DoesNotFit as e:
          out.append((overrides, str(e)))
          log(f"  {' '.join(overrides)}: does not fit")
          continue
        except JaxftError as e:  # a split this model cannot take (e.g. heads the tensor axis does not divide)
          out.append((overrides, str(e)))
          log(f"  {' '.join(overrides)}: {e}")
          continue
        out.append((overrides, p))
        log(f"  {' '.join(overrides)}: peak {_gib(p.peak_bytes)}, ~{1000 * p.step_s:,.2f} ms a step, "
            f"{p.examples_per_s_per_chip:,.1f} examples/s per chip (estimates)")
        fitted = True
        break  # recomputing blocks only costs time where the step fits without it
      if fitted:
        break
      micro //= 2
  return sorted(out, key=lambda r: -r[1].examples_per_s_per_chip if isinstance(r[1], Plan) else 0)


def _cached_transform(exp, par, target, compiler, k: int):
  """A cached phase: plans the feature pass (the frozen backbone once per example, as evaluation runs it) and
  returns the batch transform its head-only step sees (the backbone's inputs replaced by the features)."""
  features = par.compile_eval(exp.cache_features, target)
  per_example = None
  for _, (count, batch) in _eval_shapes(exp, "train").items():
    args = (target.params, target.model_state, _abstract(batch, par.batch_sharding))
    compiler(f"features {exp.phases[k].name}", lambda: features.lower(*args), count, batch=batch)
    out = jax.eval_shape(exp.cache_features, *args)
    per_example = (out.shape[np.ndim(batch["index"]):], out.dtype)

  def transform(b):
    kept = {key: v for key, v in b.items() if key not in exp.backbone.inputs}
    return {**kept, "features": np.zeros(np.shape(b["index"]) + per_example[0], per_example[1])}
  return transform


def _plan_generate(exp, par, target, compiler) -> None:
  """A causal LM's generation loop (sft's evaluation, jaxft generate): eval batches of the longest prompt's
  bucket, task.max_new_tokens new tokens."""
  from jaxft import generate as gen
  prompts = exp.splits["validation"].meta.get("prompts")
  longest = max(map(len, prompts)) if prompts else exp.cfg.data.max_length // 2
  P = gen.prompt_length(exp, longest)
  B, g = exp.cfg.train.eval_batch_size, exp.cfg.task
  step, rows = gen.program(par, B)
  replicated = jax.sharding.NamedSharding(par.mesh, jax.sharding.PartitionSpec())
  ids = jax.ShapeDtypeStruct((B, P), np.int32, sharding=rows or replicated)
  key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated)
  params, model_state = target.params, target.model_state
  if exp.replicas:
    params, model_state = jax.eval_shape(exp.replicas.first, params, model_state)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
  g_kw = dict(apply=exp.apply, new_cache=exp.backbone.new_cache, max_new=g.max_new_tokens,
              temperature=float(g.temperature), top_p=float(g.top_p), eos_id=int(exp.task.eos_id))
  compiler("generate", lambda: step.lower(params, model_state, ids, ids, key, **g_kw), 1,
           shape=f"{B} x {P} prompt + {g.max_new_tokens} new")


# ---- output --------------------------------------------------------------------------------------------------


def to_json(p: Plan) -> str:
  return json.dumps(dataclasses.asdict(p))


def table(p: Plan):
  from rich.table import Table
  t = Table(title=f"jaxft plan: {p.slices} x {p.topology} = {p.chips} {p.chip} chips ({_gib(p.hbm_bytes)} HBM, "
                  f"{p.peak_flops / 1e12:.0f} TFLOP/s bf16 each: {p.chip_source}), mesh {p.mesh}, batch "
                  f"{p.batch_size}, {p.compute_dtype}")
  for col in ("program", "batch", "calls", "params", "opt state", "rest", "peak / chip", "GFLOP / chip",
              "est. ms", "estimate from", "collectives (count, MiB)"):
    t.add_column(col, justify="left" if col in ("program", "batch", "estimate from", "collectives (count, MiB)")
                 else "right")
  for g in p.programs:
    coll = ", ".join(f"{k} {c} ({b / 2 ** 20:,.0f})" for k, (c, b) in g.collectives.items()) or "none"
    t.add_row(g.name, g.shape, str(g.calls), _gib(g.params_bytes), _gib(g.opt_bytes),
              _gib(g.peak_bytes - g.params_bytes - g.opt_bytes), _gib(g.peak_bytes), f"{g.flops / 1e9:,.1f}",
              f"{1000 * g.estimate_s:,.3f}", g.estimate_source, coll)
  return t


def summary(p: Plan) -> str:
  fit = (f"fits: peak {_gib(p.peak_bytes)} of {_gib(p.hbm_bytes)} per chip ({100 * p.peak_bytes / p.hbm_bytes:.0f}%)"
         if p.fits else f"does NOT fit: peak {_gib(p.peak_bytes)} > {_gib(p.hbm_bytes)}")
  tokens = (f", {p.trained_tokens_per_s_per_chip:,.0f} trained tokens/s per chip"
            if p.trained_tokens_per_s_per_chip else "")
  lines = [fit,
           f"ESTIMATED train step {1000 * p.step_s:,.3f} ms ({p.step_source}): {p.examples_per_s_per_chip:,.1f} "
           f"examples/s per chip{tokens}, MFU {100 * p.mfu:.1f}% (model FLOPs over the bf16 peak); compiled in "
           f"{p.compile_s:.0f} s. Estimates from the TPU compiler's cost model, not measurements."]
  if p.bottleneck:
    lines.append(f"input: the chips take ~{p.appetite_examples_per_s:,.0f} examples/s (estimate); the batch pipeline "
                 f"makes {p.host_examples_per_s:,.0f}/s here with {p.host_workers} workers (measured on this machine, "
                 f"{os.cpu_count()} cores; every host makes the whole global batch): bottleneck {p.bottleneck}")
  return "\n".join(lines + [f"note: {n}" for n in p.notes])


def search_summary(results: list, config_path: str | None) -> str:
  """The tried settings, best first, and the best as a command to paste."""
  lines = []
  for overrides, r in results:
    what = (f"peak {_gib(r.peak_bytes)}, ~{1000 * r.step_s:,.2f} ms a step, {r.examples_per_s_per_chip:,.1f} "
            f"examples/s per chip, MFU {100 * r.mfu:.1f}%" if isinstance(r, Plan) else "does not fit"
            if "does not fit" in r else r)
    lines.append(f"{' '.join(overrides)}: {what}")
  best = next(((o, r) for o, r in results if isinstance(r, Plan)), None)
  if best is None:
    return "\n".join(lines + ["nothing tried fits: see each line's reason"])
  return "\n".join(lines + [f"best, by the compiler's estimates (largest batch shape): jaxft train "
                            f"{config_path or ''} {' '.join(best[0])}".replace("  ", " ")])


def search_json(results: list) -> str:
  return json.dumps([{"overrides": o, **({"plan": dataclasses.asdict(r)} if isinstance(r, Plan) else {"error": r})}
                     for o, r in results])
