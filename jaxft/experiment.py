"""One place builds an experiment: source -> provider -> task -> rules -> phases, and the train steps.

`build(cfg)` is used by train, eval, bench, inspect, export and the benchmarks alike.
"""
import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import hparams, labels, lora, models, noise_scale, optim, parallel, quantize, replicas, rules, tasks
from jaxft import phases as phases_lib
from jaxft.data import batching, packing, sources
from jaxft.errors import JaxftError
from jaxft.step import TrainState, init_state, make_eval_step, make_train_step
from jaxft.tasks.base import Examples, Task


@dataclasses.dataclass
class Experiment:
  cfg: Any
  backbone: models.Backbone
  task: Task
  splits: dict  # "train" | "validation" | "test" -> tasks.base.Examples
  phases: list  # phases_lib.Phase
  apply: Callable  # (params, batch, train, rng, model_state) -> (outputs, model_state): backbone + head
  features: Callable  # (params, model_state, batch) -> what the head reads (eval mode), for caching
  head_apply: Callable  # apply on cached features: batch["features"] -> outputs
  buckets: list[int]  # batch lengths
  best_metric: str  # validation metric that picks the best checkpoint
  lower_is_better: bool
  pack: bool  # training examples share rows (data.pack, where the task and the model can)
  init_params: Callable[[int], dict]  # seed -> initial params (the state holds those of cfg.seed)
  replicas: replicas.Replicas  # train.seeds: the state then has a replica axis (none: a plain run)
  platform: str  # what the steps are compiled for: 'cpu' | 'gpu' | 'tpu' (jaxft plan: the target's)

  conventions = property(lambda self: self.backbone.conventions)
  labels = property(lambda self: self.phases[0].labels)  # the first phase's, for single-phase runs
  tx = property(lambda self: self.phases[0].tx)
  lr = property(lambda self: self.phases[0].lr)
  total_steps = property(lambda self: sum(p.max_steps for p in self.phases))
  micro_steps = property(lambda self: self.cfg.train.batch_size // (self.cfg.train.micro_batch_size
                                                                     or self.cfg.train.batch_size))
  # what else reads the micro-batches' gradients: the gradient noise scale (with accumulation)
  hooks = property(lambda self: (noise_scale.NoiseScale(),) if self.micro_steps > 1 else ())

  def train_step(self, k: int = 0, axis_name: str | None = None, cached: bool = False, units: int = 1):
    """Phase k's pure train step (state, batch) -> (state, metrics); `cached`: on cached features. units:
    train.batch_schedule's batches of `units` x train.batch_size (as many more micro-batches; their optimizer)."""
    phase = self.phases[k]
    tx = phase.grown(units)[0] if units > 1 else phase.tx
    apply = self.head_apply if cached else self.task.forward(functools.partial(self.apply, frozen_bn=self.frozen_bn(k)))
    opt_metrics = None
    if phase.cfg.optim.name in ("lars", "lamb"):  # their trust ratios, per layer group
      groups = optim.trust_ratio_groups(self.state_shapes(k).params, self.conventions)
      opt_metrics = functools.partial(optim.trust_ratio_metrics, groups=groups)
    step = make_train_step(apply, self.task.loss, tx, phase.labels, phase.cfg.train.dropout, axis_name,
                           self.micro_steps * units, opt_metrics, self.hooks, units)
    return self.replicas.vectorize_train(step, self.axes(k))

  def state_shapes(self, k: int = 0) -> TrainState:
    """ShapeDtypeStructs of one run's (one replica's) train state in phase k."""
    return jax.eval_shape(lambda: init_state(self.init_params(self.cfg.seed), self.phases[k].tx, self.cfg.seed,
                                             self.model_state({}), self.hooks))

  def axes(self, k: int = 0) -> TrainState:
    """The replica axis of each leaf of phase k's state (0, or None for shared params)."""
    return self.replicas.axes(self.state_shapes(k))

  def carry_over(self, state: TrainState, k: int) -> TrainState:
    """Phase k's start from the state phase k - 1 ended with (phases.carry_over), replica by replica."""
    carry = functools.partial(phases_lib.carry_over, tx=self.phases[k].tx)
    return self.replicas.vmap(carry, self.axes(k - 1), self.axes(k))(state)

  def frozen_bn(self, k: int) -> frozenset:
    """Phase k's BatchNorm layers that keep their running statistics in training: all of them with
    model.bn=frozen, else those of frozen layers (their scale is frozen)."""
    bb, labels = self.backbone, rules.flat(self.phases[k].labels)
    return frozenset(p for p in bb.batch_norm
                     if self.cfg.model.bn == "frozen" or labels[f"{bb.key}/{p}/scale"] == "frozen")

  def initial_state(self) -> TrainState:
    """Phase 0's initial train state, on the host: every replica's where train.seeds; ShapeDtypeStructs for
    model.weights=shapes. Made on each call: nothing keeps a host copy."""
    make = functools.partial(self.replicas.initial_state, self.seed_state)
    return jax.eval_shape(make) if self.cfg.model.weights == "shapes" else make()

  def seed_state(self, seed: int, setting: dict) -> TrainState:
    """Phase 0's initial train state of one run with `seed` (its head, adapters and dropout key) and the values
    of train.sweep's keys in `setting` (held in its optimizer state)."""
    state = init_state(self.init_params(seed), self.phases[0].tx, seed, self.model_state(setting), self.hooks)
    values = optim.hparams_of(setting)
    return state.replace(opt_state=optim.with_hparams(state.opt_state, values)) if values else state

  def model_state(self, setting: dict) -> dict:
    """A replica's initial model state: the backbone's (BatchNorm statistics) and its values of the swept keys
    that act outside the optimizer (hparams.py)."""
    held = hparams.held(self.cfg, setting)
    return {**(self.backbone.state or {}), **held} if held else self.backbone.state

  def train_batches(self, shards: int = 1, rows_of=lambda n: slice(None), seed: int | None = None
                    ) -> batching.TrainBatches:
    """The run's training batches in the data order of `seed` (default: the config's): packed into rows of
    data.max_length (their count a multiple of 2, of the mesh's `shards` and of the micro-batches) where
    `pack`, else padded to length buckets."""
    cfg = self.cfg
    seed = cfg.seed if seed is None else seed
    if self.pack:
      make = functools.partial(batching.collate_packed, task_collate_packed=self.task.collate_packed,
                               length=cfg.data.max_length, slots=PACK_SLOTS, multiple=self.row_multiple(shards))
      return batching.TrainBatches(self.splits["train"], make, cfg.train.batch_size, self.total_steps, seed,
                                   rows_of, sort_window=1)
    return batching.bucketed(self.splits["train"], self.task.collate, cfg.train.batch_size, self.total_steps,
                             seed, self.buckets, rows_of, cfg.data.sort_window)

  def row_multiple(self, shards: int = 1) -> int:
    """Packed training batches have a multiple of this many rows (2, the data shards, the micro-batches)."""
    return math.lcm(2, shards * self.micro_steps)

  def batch_length(self, idx, shards: int = 1) -> int:
    """The varying dim of the training batch of examples `idx`: its rows (packed) or bucket length."""
    ex = self.splits["train"]
    if self.pack:
      return packing.plan(idx, ex.lengths, self.cfg.data.max_length, PACK_SLOTS, self.row_multiple(shards)).num_rows
    return batching.bucket(max(ex.lengths[i] for i in idx), self.buckets)

  def eval_batches(self, split: str):
    """A split's evaluation batches, every example once: packed into train.eval_batch_size rows of
    data.max_length where training packs and the task evaluates packed rows, else padded to buckets."""
    ex, size = self.splits[split], self.cfg.train.eval_batch_size
    if self.pack and self.task.packs_eval:
      return batching.packed_eval_batches(ex, self.task.collate_packed, size, self.cfg.data.max_length, PACK_SLOTS)
    return batching.eval_batches(ex, self.task.collate, size, self.buckets)

  def eval_step(self, axis_name: str | None = None, cached: bool = False):
    """The pure eval step (params, model_state, batch) -> (sums, rows); of every replica ([R, ...]) at
    once in seed-vectorised runs, on the same batch."""
    step = make_eval_step(self.head_apply if cached else self.apply, self.task, axis_name)
    return self.replicas.vectorize_eval(step, self.axes())

  def describe(self, metrics: dict) -> str:
    """One log line of metrics: the task's, or their mean ± 95% CI over the replicas."""
    return self.replicas.describe(self.task, metrics)

  def cache_features(self, params, model_state, batch):
    """What the head reads (eval mode), for train.cache_features. Replicas cache one table: a cached phase
    comes before any phase that trains the backbone (phases.check_cacheable), so theirs are equal."""
    return self.features(*self.replicas.first(params, model_state), batch)


def _array(x):
  """A param as an array: model.weights=shapes gives ShapeDtypeStructs, zeros here (inside jax.eval_shape)."""
  return jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x


PACK_SLOTS = 8  # at most this many examples share a packed row


def _packing(want: bool | None, task, backbone) -> bool:
  """Whether training examples are packed: data.pack, or (null) wherever the task and the model can."""
  why = task.cannot_pack() or (None if backbone.packs else f"{backbone.name} takes no packed rows (segment ids)")
  if want and why:
    raise JaxftError(f"config key 'data.pack' is true, but {why}; set data.pack=false (or null)")
  return want is not False and why is None


def _saved_head(task, backbone) -> Path:
  """Where `jaxft export` writes the task's head beside the backbone (it may not be there)."""
  return Path(backbone.name) / f"{task.head_key}.msgpack"


def _head(task, backbone, seed: int):
  """A new head, or the one `jaxft export` saved beside the backbone (`<head_key>.msgpack`); None for a
  task that adds none (a causal LM's head is the model's own)."""
  if task.head_key is None:
    return None, False
  head = task.init_head(jax.random.PRNGKey(seed))
  saved = _saved_head(task, backbone)
  if not saved.is_file():
    return head, False
  loaded = flax.serialization.msgpack_restore(saved.read_bytes())
  want = jax.tree.map(jnp.shape, head)
  if jax.tree.map(jnp.shape, loaded) != want:
    raise JaxftError(f"{saved}: head shapes {jax.tree.map(jnp.shape, loaded)} do not fit this task's {want}")
  return loaded, True


def _quantized(cfg, backbone, log) -> tuple[list, dict | None]:
  """(the Dense modules model.quantize keeps quantized, their kept blocks {module: leaves} where the
  checkpoint's own are used: model.quantize=gguf)."""
  kind = cfg.model.quantize
  if kind is None:
    return [], None
  modules = quantize.target_modules({backbone.key: backbone.params}, backbone.conventions)
  kept = None
  if kind == "gguf" and cfg.model.weights == "pretrained":
    if backbone.kept_blocks is None:
      raise JaxftError(f"model.quantize=gguf keeps a GGUF file's own blocks; {backbone.name} is not a GGUF file "
                       f"(model.quantize=nf4 or int8 quantize any checkpoint)")
    kept = {f"{backbone.key}/{m}": leaves for m, leaves in backbone.kept_blocks().items()}
    other = [m for m in modules if m not in kept]
    if other:
      raise JaxftError(f"model.quantize=gguf: {backbone.name} stores {other[0].split('/', 1)[1]} (and "
                       f"{len(other) - 1} more) in a type other than Q4_0 / Q4_1 / Q8_0; use model.quantize=nf4")
  log(f"model.quantize={kind}: {len(modules)} projection kernels kept quantized"
      + (" (the GGUF file's own blocks)" if kept else ""))
  return modules, kept


def build(cfg, log=print, platform: str | None = None, length_key: str = "data.max_length",
          run_labels: tuple | None = None, data: bool = True) -> Experiment:
  """platform: what the programs are compiled for (default: this process's devices); some choices differ
  per platform (models.load, replicas.chunk). length_key: what set data.max_length, for the error when the
  model's position embeddings are shorter. run_labels: (labels, where) of the run's checkpoints, whose order
  the task takes (else an exported head's, from the model directory; jaxft/labels.py). data=False: no split
  is read (jaxft generate needs the model only)."""
  platform = platform or jax.default_backend()
  source = sources.load(cfg.data, log) if data else sources.Source({s: [] for s in sources.SPLITS}, {})
  task_cls = tasks.get(cfg.task.name)
  model = models.open(cfg.model)
  model.check_length(cfg.data.max_length, length_key)  # before the weights load
  backbone = model.load(cfg.model, cfg.seed, cfg.precision.compute, task_cls.needs_pooler(cfg, model.pooling), log,
                        platform)
  task = task_cls(cfg, backbone, source, log)
  if run_labels:
    labels.adopt(task, *run_labels, "use data of those labels, or train in a new run_dir", log)
  elif task.head_key is not None and (saved := _saved_head(task, backbone)).is_file():  # the exported head's labels
    labels.adopt(task, labels.exported(backbone.name), f"the head in {saved}",
                 f"use data of those labels, or a new head (the backbone without {saved.name})", log)
  best = cfg.train.best_metric or task.best_metric
  if best not in task.metrics:
    raise JaxftError(f"config key 'train.best_metric' is {best!r}; {cfg.task.name} reports {', '.join(task.metrics)}")
  targets = lora.targets(cfg.lora, backbone.conventions)

  head, reused = _head(task, backbone, cfg.seed)
  if head is not None:
    log(f"task {cfg.task.name}: head '{task.head_key}' {'from ' + backbone.name if reused else 'newly initialised'}")

  def init_params(seed: int) -> dict:
    """The run's initial params for `seed`: the backbone as loaded, a new head and LoRA adapters.
    (model.weights=shapes: call it under jax.eval_shape; the backbone's params are only shapes.)"""
    h = head if seed == cfg.seed else _head(task, backbone, seed)[0]
    params = {backbone.key: jax.tree.map(_array, backbone.params), **({task.head_key: h} if h is not None else {})}
    params = jax.tree.map(lambda x: x.astype(cfg.precision.params) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          params)
    params = lora.add_adapters(params, targets, cfg.lora, seed) if targets else params
    return quantize.quantize(params, quantized, cfg.model.quantize, kept) if quantized else params

  quantized, kept = _quantized(cfg, backbone, log)
  abstract = cfg.model.weights == "shapes"  # jaxft plan: every array below is a ShapeDtypeStruct
  params = jax.eval_shape(lambda: init_params(cfg.seed)) if abstract else init_params(cfg.seed)

  def apply(params, batch, train=False, rng=None, model_state=None, frozen_bn=frozenset()):
    rng_backbone, rng_head = jax.random.split(rng) if rng is not None else (None, None)
    bn = {"frozen_bn": frozen_bn} if frozen_bn else {}  # only families with BatchNorm have frozen layers
    model_state, swept = hparams.split(model_state)  # (train.sweep's values pass by: the caller's hparams.scope)
    out, model_state = backbone.apply(params[backbone.key], batch, train, rng_backbone, model_state, **bn)
    model_state = {**model_state, hparams.KEY: swept} if swept else model_state
    return task.head(params.get(task.head_key), task.features(out, batch), batch, train, rng_head), model_state

  def features(params, model_state, batch):
    model_state = hparams.split(model_state)[0]
    return task.features(backbone.apply(params[backbone.key], batch, False, None, model_state)[0], batch)

  def head_apply(params, batch, train=False, rng=None, model_state=None):
    return task.head(params[task.head_key], batch["features"], batch, train, rng), model_state

  if quantized:  # (inside LoRA's: its interceptor adds the adapters to what this one computes)
    apply = quantize.wrap(apply, cfg.model.quantize)
  if targets:
    apply = lora.wrap(apply, cfg.lora)
  splits = ({s: task.encode(records, s) for s, records in source.splits.items()} if data else
            {s: Examples(np.zeros(0, np.int32), {}) for s in sources.SPLITS})
  phases = phases_lib.build(cfg, params, len(splits["train"]), task, backbone.conventions)
  reps = replicas.of(cfg, phases, platform)
  for k, phase in enumerate(phases):
    phases_lib.check_cacheable(phase, task, phases[:k] if reps else ())
  buckets = batching.length_buckets(cfg.data)
  exp = Experiment(cfg=cfg, backbone=backbone, task=task, splits=splits, phases=phases, apply=apply,
                   features=features, head_apply=head_apply, buckets=buckets, best_metric=best,
                   lower_is_better=best in task.lower_is_better, pack=_packing(cfg.data.pack, task, backbone),
                   init_params=init_params, replicas=reps, platform=platform)
  if reps:
    shared = sum(x.size for p, x in rules.flat(exp.state_shapes().params).items() if p not in reps.own)
    what = (f"train.sweep: {len(set(map(str, reps.settings)))} settings x {len(set(reps.seeds))} seeds"
            if cfg.train.sweep else f"train.seeds: {len(reps.seeds)} replicas (seeds {', '.join(map(str, reps.seeds))})")
    log(f"{what} in one step; {shared:,} never-trained params held once for all")
  return exp


def setup(exp, log, devices=None, slices: int = 1):
  """(Parallel, the restore target of each phase's checkpoints): its optimizer state, on the mesh over
  `devices` (default: all of this process's; jaxft plan: a TPU topology's, `slices` of them)."""
  cfg = exp.cfg
  par = parallel.Parallel(cfg, parallel.make_mesh(cfg.parallel.mesh, devices, slices), exp.conventions.tensor_parallel)
  log(parallel.describe(par.mesh) + f", backend {cfg.parallel.backend}")
  return par, [exp.replicas.abstract_state(par, exp.state_shapes(k)) for k in range(len(exp.phases))]


def save_model(exp: Experiment, params, out_dir, model_state=None) -> None:
  """A model directory `model.name` loads back: the backbone in its family's format (with its BatchNorm
  statistics), and the head."""
  exp.backbone.save(params[exp.backbone.key], out_dir, hparams.split(model_state)[0])
  if exp.task.head_key is not None:
    exp.task.save(jax.device_get(params[exp.task.head_key]), Path(out_dir))
