"""Devices, hosts and shardings: mesh, sharding rules, multi-host init, and the two backends.

  jit:  jax.jit with in/out NamedShardings on a (data, fsdp, tensor) mesh. Params and optimizer
        state follow the sharding rules (TP) plus FSDP on the largest divisible dim; the batch is
        split over (data, fsdp).
  pmap: the same step under jax.pmap with gradients pmean-ed over devices; data-parallel only.

`train.batch_size` is always the global batch; each host feeds its rows of it.
"""
import contextvars
import os
import re

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxft import replicas
from jaxft import rules as rules_lib
from jaxft.errors import JaxftError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_AUTO_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
             "TPU_WORKER_HOSTNAMES")


def initialize(pcfg) -> None:
  """jax.distributed.initialize from the config, or auto-detected (TPU pods, SLURM, env vars)."""
  explicit = (pcfg.coordinator, pcfg.num_processes, pcfg.process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise JaxftError("set all of parallel.coordinator, parallel.num_processes and parallel.process_id")
    jax.distributed.initialize(pcfg.coordinator, pcfg.num_processes, pcfg.process_id)
  elif any(k in os.environ for k in _AUTO_ENV) or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


def make_mesh(mcfg, devices=None, slices: int = 1) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all); with `slices` > 1 (TPU slices joined by
  the data-centre network), the data axis spans the slices and the rest stays inside each slice."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = {"data": mcfg.data, "fsdp": mcfg.fsdp, "tensor": mcfg.tensor}
  free = [a for a, s in sizes.items() if s == -1]
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    default = " (data is -1 unless set: with fsdp or tensor -1, set parallel.mesh.data=1)" if len(free) > 1 else ""
    raise JaxftError(f"parallel.mesh {sizes}: sizes must be >= 1, and at most one may be -1{default}")
  if free and n % known == 0:
    sizes[free[0]] = n // known
  if free and n % known or not free and known != n:
    need = f"a multiple of {known}" if free else f"{known}"
    raise JaxftError(f"parallel.mesh {sizes} needs {need} devices; there are {n}")
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if slices == 1:
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=auto, devices=devices)
  if sizes["data"] % slices:
    raise JaxftError(f"parallel.mesh.data={sizes['data']} must be a multiple of the {slices} slices: data "
                     "parallelism spans the slices")
  from jax.experimental import mesh_utils
  ici = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
  grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
  return jax.sharding.Mesh(grid, AXES, axis_types=auto)


def _fit(spec, shape, mesh, path) -> P:
  """Pads `spec` to the param's rank, drops axes that do not divide their dim, then adds FSDP
  on the largest remaining dim that the fsdp axis divides."""
  if len(spec) > len(shape):
    raise JaxftError(f"sharding spec {list(spec)} has more dims than param {path} {tuple(shape)}")
  spec = list(spec) + [None] * (len(shape) - len(spec))
  spec = [a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)]
  if mesh.shape["fsdp"] > 1 and "fsdp" not in spec:
    free = [i for i, a in enumerate(spec) if a is None and shape[i] % mesh.shape["fsdp"] == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*spec)


def param_specs(params, user_rules, family_rules, mesh):
  """PartitionSpec per param: user rules first (each must match something), then the model family's
  tensor-parallel rules (models/*.py Conventions), then FSDP on top."""
  user = [(r, tuple(spec)) for r, spec in user_rules]
  rules_lib.apply_rules(params, user, what="sharding rule")  # raises on a rule that matches nothing
  raw = rules_lib.flat(rules_lib.apply_rules(params, user + list(family_rules), default=(), strict=False))

  def kernel_spec(module: str) -> tuple:  # a kernel's, where model.quantize replaced it by its quantized leaves
    if f"{module}/kernel" in raw:
      return tuple(raw[f"{module}/kernel"])
    return next((tuple(spec) for r, spec in user + list(family_rules) if re.fullmatch(r, f"{module}/kernel")), ())

  for path in raw:  # LoRA adapters follow their kernel: lora_a [in, r] its rows, lora_b [r, out] its columns
    if path.endswith(("/lora_a", "/lora_b")):
      kernel = kernel_spec(path[:-len("/lora_a")]) + (None, None)
      raw[path] = (kernel[0], None) if path.endswith("/lora_a") else (None, kernel[1])
    elif path.endswith(("/kernel_q", "/kernel_scale", "/kernel_min")):  # quantized blocks: as their kernel's rows
      raw[path] = kernel_spec(path.rsplit("/", 1)[0])
  shapes = rules_lib.flat(params)
  return rules_lib.merge({p: _fit(raw[p], shapes[p].shape, mesh, p) for p in shapes})


def state_specs(state, pspecs):
  """Specs for the whole train state: optimizer moments follow their param, the rest replicates."""
  flat_specs = rules_lib.flat(pspecs)

  def spec_of(keypath, leaf):
    path = rules_lib.owner(keypath, flat_specs)
    return flat_specs[path] if path and len(flat_specs[path]) <= leaf.ndim else P()

  opt = jax.tree_util.tree_map_with_path(spec_of, state.opt_state)
  return state.replace(step=P(), params=pspecs, opt_state=opt, rng=P(),
                       model_state=jax.tree.map(lambda _: P(), state.model_state), skipped=P(), first_skipped=P(),
                       hooks=jax.tree.map(lambda _: P(), state.hooks))


_BATCH_SHARDING = contextvars.ContextVar("batch_sharding", default=None)


def shard_batch(x):
  """Activations [B, ...] pinned to the mesh's batch axes (data, fsdp), inside a step that Parallel compiles
  (elsewhere x as is). Model families call it on their residual stream at each block: without it, XLA's
  partitioner may keep FSDP-sharded weights where they are and move activations instead (a 64-chip
  Llama-3.1-8B step: 964 GB of all-reduces and 66 GiB per chip, benchmarks/RESULTS.md)."""
  sharding = _BATCH_SHARDING.get()
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def batch_sharding():
  """The batch axes' NamedSharding inside a step that Parallel compiles (kernels that run per shard under
  shard_map take their mesh from it), else None."""
  return _BATCH_SHARDING.get()


def _on_mesh(step, sharding):
  """`step`, traced with shard_batch pinning activations to `sharding`."""
  def traced(*args, **kwargs):
    token = _BATCH_SHARDING.set(sharding)
    try:
      return step(*args, **kwargs)
    finally:
      _BATCH_SHARDING.reset(token)
  return traced


class Parallel:
  """Holds the mesh and turns the pure steps into compiled, sharded (or pmapped) ones."""

  def __init__(self, cfg, mesh, family_rules=()):
    """family_rules: the model family's tensor-parallel rules, after the config's sharding.rules."""
    self.cfg, self.mesh, self.family_rules = cfg, mesh, family_rules
    self.pmap = cfg.parallel.backend == "pmap"
    self.axis_name = "batch" if self.pmap else None  # what the steps' collectives reduce over (jit: none, XLA's)
    self.batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    # train.seeds: training batches [R, B, ...] hold every replica's; evaluation batches are everyone's
    self.train_batch_sharding = NamedSharding(mesh, P(None, BATCH_AXES)) if replicas.vectorised(cfg) else self.batch_sharding
    self.batch_shards = n_shards = mesh.shape["data"] * mesh.shape["fsdp"]  # pieces of a batch's rows
    for key in ("batch_size", "eval_batch_size", "micro_batch_size"):
      if getattr(cfg.train, key) is None:
        continue
      if getattr(cfg.train, key) % n_shards:
        raise JaxftError(f"train.{key}={getattr(cfg.train, key)} is not divisible by the {n_shards} "
                         f"data shards of the mesh {dict(mesh.shape)}")
    # CPU collectives deadlock when multi-device steps are dispatched back to back (DESIGN.md).
    self.block_each_step = jax.default_backend() == "cpu" and jax.device_count() > 1
    self._generate = {}

  def shardings(self, state):
    """NamedSharding tree for the train state (jit backend)."""
    specs = state_specs(state, param_specs(state.params, self.cfg.sharding.rules, self.family_rules, self.mesh))
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))

  def put_state(self, host_state, target):
    """Places a (host or single-device) state on the devices: sharded like `target` (from
    abstract_state), or replicated for pmap."""
    if self.pmap:  # a leading device axis; pmap scatters it on the first step
      n = jax.local_device_count()
      return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), host_state)
    return jax.device_put(host_state, _shardings_of(target))

  def restored(self, state, target):
    """A state restored onto `target` (a checkpoint's), on the devices as the steps take it."""
    return self.put_state(state, target) if self.pmap else state

  def per_example(self, out, index, rows: slice):
    """(outputs, example indices) of the rows a per-example output holds here: jit's the whole batch's
    (replicated on every host), pmap's this host's `rows`, behind a leading device axis."""
    out = np.asarray(out)
    if self.pmap:
      out, index = out.reshape((-1,) + out.shape[2:]), index[rows]
    return out, index

  def abstract_state(self, state):
    """ShapeDtypeStructs carrying the target shardings: what checkpoints restore onto."""
    if self.pmap:
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    shardings = self.shardings(state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

  def host_view(self, state):
    """The state as checkpoints hold it: one logical copy (pmap keeps a replica per device)."""
    return jax.tree.map(lambda x: x[0], state) if self.pmap else state

  def put_batch(self, local_batch, train: bool = False):
    """This host's rows of a global batch (a training one: of every replica's) -> device arrays."""
    if self.pmap:
      n = jax.local_device_count()
      return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), local_batch)
    sharding = self.train_batch_sharding if train else self.batch_sharding
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)

  def compile_train(self, train_step, target):
    if self.pmap:
      return jax.pmap(train_step, axis_name="batch", donate_argnums=0)
    shardings = _shardings_of(target)
    return jax.jit(_on_mesh(train_step, self.batch_sharding), in_shardings=(shardings, self.train_batch_sharding),
                   out_shardings=(shardings, NamedSharding(self.mesh, P())), donate_argnums=0)

  def ahead_of_time(self, step, *args):
    """(the step to call, its compiled executable for `args` or None): jit compiles here, ahead of the first
    call; pmap compiles inside its first call (None: no compiler analysis to read)."""
    if self.pmap:
      return step, None
    compiled = step.lower(*args).compile()
    return compiled, compiled

  def compile_eval(self, eval_step, target):
    """eval_step(params, model_state, batch); every output replicated (on every host)."""
    if self.pmap:
      return jax.pmap(eval_step, axis_name="batch")
    shardings = _shardings_of(target)
    return jax.jit(_on_mesh(eval_step, self.batch_sharding),
                   in_shardings=(shardings.params, shardings.model_state, self.batch_sharding),
                   out_shardings=NamedSharding(self.mesh, P()))

  def compile_generate(self, generate_loop, static_argnames: tuple, batch_size: int):
    """generate_loop(params, model_state, ids, mask, rng, **static) with the prompts' rows split over the batch
    axes (activations and KV caches follow them) and the tokens returned to every host; None where the rows
    cannot be split (pmap, or a batch that the batch shards do not divide: every device then runs it whole)."""
    if self.pmap or batch_size % self.batch_shards:
      return None
    key = (generate_loop, static_argnames)
    if key not in self._generate:  # one jit per run, so that each evaluation reuses its compiled programs
      self._generate[key] = jax.jit(_on_mesh(generate_loop, self.batch_sharding), static_argnames=static_argnames,
                                    out_shardings=NamedSharding(self.mesh, P()))
    return self._generate[key]

  def put_rows(self, x):
    """An array that every host holds whole (generation's prompts) -> its rows split over the batch axes."""
    return jax.make_array_from_callback(np.shape(x), self.batch_sharding, lambda index: x[index])

  def metrics(self, m):
    """Device metrics -> host numpy (pmap: the first replica; they are pmean-ed / psum-ed)."""
    m = jax.device_get(m)
    return jax.tree.map(lambda x: x[0], m) if self.pmap else m


def _shardings_of(target):
  """The sharding tree that abstract_state computed once, read back off its ShapeDtypeStructs."""
  return jax.tree.map(lambda x: x.sharding, target)


def process_rows(batch_size: int) -> slice:
  """The rows of each global batch that this host feeds."""
  per = batch_size // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def shards(spec, mesh) -> int:
  """Into how many pieces a PartitionSpec cuts an array on `mesh`."""
  axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def describe(mesh) -> str:
  return (f"mesh {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices, "
          f"{jax.process_count()} process(es)")

