"""Seed-vectorised runs (`train.seeds`): N independent replicas of one run, each with its own head
initialisation, LoRA adapters, dropout keys and data order, trained side by side by ONE compiled step.

The train state gains a leading replica axis [R, ...] on everything a replica owns: the params that some
phase trains, the optimizer state, BatchNorm statistics, the step counter and the dropout key. Params
that no phase trains (frozen embeddings, the LoRA base) are shared: one copy, in the state and in its
checkpoints. The step is the ordinary train step under `jax.vmap` (in_axes 0 for owned leaves, None for
shared ones), so replica k computes exactly what the single run with seed k computes. Each step feeds
every replica its own batch; their shapes (packed rows, length buckets) are padded to a common one with
weight-0 rows and positions, which change no loss.
"""
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxft import rules
from jaxft.data import batching
from jaxft.errors import JaxftError
from jaxft.step import TrainState


@dataclasses.dataclass(frozen=True)
class Replicas:
  """The replicas of a run (Experiment.replicas). A plain run has none (`seeds` empty, falsy): then every
  method passes its input through, so the loop, evaluation and restore are written once for both."""
  seed: int  # cfg.seed: a plain run's
  seeds: tuple = ()  # the replicas' seeds; () for a plain run
  settings: tuple = ()  # train.sweep: each replica's values of the swept keys ({} where nothing is swept)
  own: frozenset = frozenset()  # param paths some phase trains: one copy per replica (the rest are shared)
  chunk: int | None = None  # replicas per vmapped call of the train step (`chunk`)
  ids: tuple | None = None  # train.sweep_prune: these replicas' indices among the run's (`subset`); None: all
  size: int | None = None  # ... and the run's replica count

  @property
  def index(self) -> tuple:
    """Each replica's index among the run's."""
    return self.ids if self.ids is not None else tuple(range(len(self.seeds)))

  def subset(self, alive) -> "Replicas":
    """The replicas of the run's `alive` indices (train.sweep_prune drops the rest): their metrics lists keep the
    run's length, nan for the dropped ones (`merge`)."""
    alive = tuple(alive)
    return dataclasses.replace(self, seeds=tuple(self.seeds[i] for i in alive),
                               settings=tuple(self.settings[i] for i in alive), ids=alive, size=len(self.seeds))

  def __bool__(self):
    return bool(self.seeds)

  @property
  def lanes(self) -> int:
    """Models trained side by side: the replicas, or the plain run's one."""
    return max(1, len(self.seeds))

  def axes(self, state: TrainState) -> TrainState:
    """The replica axis of each leaf of a state (`axes`)."""
    return axes(state, self.own)

  def vectorize_train(self, train_step, state_axes: TrainState):
    return vectorize_train(train_step, state_axes, self.chunk) if self else train_step

  def vectorize_eval(self, eval_step, state_axes: TrainState):
    return vectorize_eval(eval_step, state_axes) if self else eval_step

  def vmap(self, fn, in_axes, out_axes):
    """fn of one state, replica by replica."""
    return jax.vmap(fn, in_axes=(in_axes,), out_axes=out_axes) if self else fn

  def initial_state(self, seed_state) -> TrainState:
    """Phase 0's initial state: seed_state(seed, setting) of the run, or every replica's, stacked."""
    if not self:
      return seed_state(self.seed, {})
    return stack([seed_state(s, setting) for s, setting in zip(self.seeds, self.settings, strict=True)], self.own)

  def abstract_state(self, par, single: TrainState) -> TrainState:
    """The state's ShapeDtypeStructs on the mesh, from one replica's."""
    return abstract_state(par, single, self.own, len(self.seeds)) if self else par.abstract_state(single)

  def batches(self, make):
    """The training batches: make(seed) of the run, or every replica's in its own data order (`Batches`)."""
    return Batches([make(s) for s in self.seeds]) if self else make(self.seed)

  def sources(self, batches) -> list:
    """Each replica's training batches in `batches` (a plain run's: [batches])."""
    return batches.sources if self else [batches]

  def same_batch(self, batch: dict) -> dict:
    """One batch for every replica (bench)."""
    return stack_batches([batch] * len(self.seeds)) if self else batch

  def unstack(self, tree) -> list:
    """A tree with the replica axis -> one tree per replica (a plain run's: [tree])."""
    return unstack_tree(tree, len(self.seeds)) if self else [tree]

  def each(self, params, model_state) -> list:
    """[(params, model_state)] of every replica."""
    if not self:
      return [(params, model_state)]
    return [(take(params, r, self.own), take(model_state, r)) for r in range(len(self.seeds))]

  def first(self, params, model_state):
    """Replica 0's params and model state (a plain run's own)."""
    return (take(params, 0, self.own), take(model_state, 0)) if self else (params, model_state)

  def merge(self, per_replica: list[dict]) -> dict:
    """One metrics dict of every replica's (`aggregate`); a plain run's own. Of a subset: each `<metric>_seeds`
    list is the run's, nan where a replica was dropped."""
    if not self:
      return per_replica[0]
    out = aggregate(per_replica)
    if self.ids is not None:
      for key in [k for k in out if k.endswith("_seeds")]:
        values = dict(zip(self.ids, out[key]))
        out[key] = [values.get(r, math.nan) for r in range(self.size)]
    return out

  def metrics(self, m: dict) -> dict:
    """Train metrics with the replica axis -> aggregated."""
    return self.merge(self.unstack(m))

  def describe(self, task, metrics: dict) -> str:
    """One log line: the task's, or each metric's mean ± 95% CI over the replicas (a sweep's: all its settings)."""
    return describe(task.metrics, metrics, "replicas of the sweep" if self.swept else "seeds") if self else \
        task.describe(metrics)

  @property
  def swept(self) -> bool:
    return any(self.settings)

  def sweep_table(self, metric: str, lower_is_better: bool, val_best: list, test: dict, pruned: list | None = None
                  ) -> list[str]:
    """train.sweep's result, one line per setting (its seeds' mean ± 95% CI of the best validation `metric`, and
    of the test's from each replica's best checkpoint), best first, then the winner as overrides to paste.
    pruned: per replica, the step train.sweep_prune dropped it at (its setting is then not tested)."""
    groups = {}
    for r, setting in enumerate(self.settings):
      groups.setdefault(tuple(setting.items()), []).append(r)
    rows = []
    for setting, members in groups.items():
      dropped = pruned[members[0]] if pruned else None
      val = summary([val_best[r] for r in members])
      test_of = None if dropped is not None else summary([test[f"{metric}_seeds"][r] for r in members])
      rows.append((dropped is not None, -(dropped or 0), val, test_of, setting, len(members)))
    sign = 1 if lower_is_better else -1
    rows.sort(key=lambda row: (row[0], row[1], sign * row[2][0]))  # tested ones first, then the last dropped
    overrides = lambda setting: " ".join(f"{k}={v:g}" for k, v in setting)  # noqa: E731
    width = max(len(overrides(row[4])) for row in rows)
    cols = max(15, len(f"validation {metric}"))
    lines = [f"{'setting':{width}}  {'validation ' + metric:>{cols}}  {'test ' + metric:>{cols}}  (best checkpoints; "
             f"mean ± 95% CI over seeds)"]
    for is_dropped, at, (v, v_ci), t, setting, n in rows:
      test_col = f"dropped at step {-at}" if is_dropped else f"{t[0]:.4f} ± {t[1]:.4f}"
      lines.append(f"{overrides(setting):{width}}  {f'{v:.4f} ± {v_ci:.4f}':>{cols}}  {test_col:>{cols}}  ({n} seeds)")
    return lines + [f"winner by validation {metric}: {overrides(rows[0][4])}"]

  def note_best(self, record, values: list, step: int, better) -> None:
    """Each replica's best step: where its own value of train.best_metric improved (better(new, old))."""
    if not self:
      return
    n = self.size or len(self.seeds)
    record.best_steps = record.best_steps or [None] * n
    record.best_values = record.best_values or [None] * n
    for r, value in enumerate(values):
      if not math.isnan(value) and better(value, record.best_values[r]):
        record.best_steps[r], record.best_values[r] = step, value

  def at_best(self, record, states: dict, step: int):
    """(params, model_state) with replica r at its best step (states: step -> restored state; a replica
    without a recorded best takes `step`), or None for a plain run (it takes states[record.best_step])."""
    if not self:
      return None
    n = len(self.seeds)
    record.best_steps = [step if s is None else s for s in record.best_steps or [None] * n]
    record.best_values = record.best_values or [None] * n
    return (assemble({s: x.params for s, x in states.items()}, record.best_steps, self.own),
            assemble({s: x.model_state for s, x in states.items()}, record.best_steps))

  def chosen(self, replica: int | None, run_dir) -> int | None:
    """The replica a one-model command (export, generate) uses: --replica, which a seed-vectorised run needs."""
    if not self:
      if replica is not None:
        raise JaxftError(f"--replica {replica}: {run_dir} is a single run (train.seeds is not set)")
      return None
    if replica is None or not 0 <= replica < len(self.seeds):
      raise JaxftError(f"{run_dir} holds {len(self.seeds)} replicas (train.seeds): choose one with --replica K, "
                       f"0 <= K < {len(self.seeds)} (seeds {', '.join(map(str, self.seeds))})")
    return replica

  def one(self, state: TrainState, r: int | None) -> TrainState:
    """Replica r of a state (None: the state as it is)."""
    if r is None:
      return state
    return state.replace(params=take(state.params, r, self.own), model_state=take(state.model_state, r))


def of(cfg, phases, platform: str) -> Replicas:
  """The run's replicas (train.seeds, train.sweep), each owning the params some phase trains."""
  replicas = grid(cfg)
  if not replicas:
    return Replicas(cfg.seed)
  settings, seeds = zip(*replicas)
  return Replicas(cfg.seed, tuple(seeds), tuple(settings), owned(phases), chunk(cfg, platform))


def vectorised(cfg) -> bool:
  """Whether the run has replicas (train.seeds, train.sweep): its state and training batches a replica axis."""
  return cfg.train.seeds is not None or bool(cfg.train.sweep)


def grid(cfg) -> list[tuple[dict, int]]:
  """(setting, seed) of every replica: each combination of train.sweep's values (the first key varying
  slowest), crossed with train.seeds (or the run's seed); [] for a plain run."""
  seeds = seeds_of(cfg) or ([cfg.seed] if cfg.train.sweep else [])
  keys = list(cfg.train.sweep or {})
  settings = [dict(zip(keys, values)) for values in itertools.product(*(cfg.train.sweep[k] for k in keys))]
  return [(setting, seed) for setting in settings for seed in seeds]


def seeds_of(cfg) -> list[int]:
  """The replicas' seeds: train.seeds N -> seed .. seed + N - 1, or the list given; [] for a plain run."""
  s = cfg.train.seeds
  if s is None:
    return []
  return list(range(cfg.seed, cfg.seed + s)) if isinstance(s, int) else [int(x) for x in s]


def chunk(cfg, platform: str) -> int | None:
  """Replicas per vmapped call of the train step (train.replica_chunk; null: all of them on an accelerator,
  where one replica leaves it mostly idle, and one at a time on CPU, where a vmapped step is slower than a
  loop of single ones: benchmarks/RESULTS.md)."""
  n = cfg.train.replica_chunk
  if n is None:
    return 1 if platform == "cpu" else None
  return None if n >= len(grid(cfg)) else n


def owned(phases) -> frozenset:
  """Param paths some phase trains: each replica has its own copy of these."""
  return frozenset().union(*(rules.trained(ph.labels) for ph in phases))


def axes(state: TrainState, own: frozenset) -> TrainState:
  """vmap axes of a replicated state: 0 on every leaf, None on the shared (never trained) params."""
  flat = rules.flat(state.params)
  params = rules.merge({p: (0 if p in own else None) for p in flat})
  return jax.tree.map(lambda _: 0, state).replace(params=params)


def stack(states: list[TrainState], own: frozenset) -> TrainState:
  """One replicated state from per-replica ones (the shared params taken from the first)."""
  flat = [rules.flat(s.params) for s in states]
  params = rules.merge({p: (jnp.stack([f[p] for f in flat]) if p in own else x) for p, x in flat[0].items()})
  rest = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.replace(params={}) for s in states])
  return rest.replace(params=params)


def abstract_state(par, single, own: frozenset, n: int) -> TrainState:
  """The replicated state's ShapeDtypeStructs, from one replica's (`single`): owned leaves gain a leading
  axis of n, unsharded (each replica's leaf is sharded as the single run's is); shared ones keep theirs."""
  spec = par.abstract_state(single)
  def widen(x, ax):
    s = x.sharding
    return jax.ShapeDtypeStruct((n,) + x.shape, x.dtype, sharding=NamedSharding(s.mesh, P(None, *s.spec)))
  return jax.tree.map(lambda x, ax: x if ax is None else widen(x, ax), spec, axes(spec, own),
                      is_leaf=lambda x: x is None)


def take(tree, r: int, own: frozenset | None = None):
  """Replica r of a replicated tree: of params when `own` is given (shared leaves are everyone's), else of
  a tree whose every leaf has the replica axis (model state)."""
  if own is None:
    return jax.tree.map(lambda x: x[r], tree)
  return rules.merge({p: (x[r] if p in own else x) for p, x in rules.flat(tree).items()})


def gather(state: TrainState, alive, own: frozenset) -> TrainState:
  """Replicas `alive` (indices) of a replicated state; the shared params as they are."""
  idx = jnp.asarray(alive)
  return jax.tree.map(lambda x, ax: x if ax is None else x[idx], state, axes(state, own), is_leaf=lambda x: x is None)


def scatter(full: TrainState, alive, sub: TrainState, own: frozenset) -> TrainState:
  """`full` with replicas `alive` (indices) replaced by those of `sub` (gather's inverse); the shared params are
`sub`'s (the train step donates them: `full`'s may be gone)."""
  idx = jnp.asarray(alive)
  return jax.tree.map(lambda f, x, ax: x if ax is None else f.at[idx].set(x), full, sub, axes(full, own),
                      is_leaf=lambda x: x is None)


def vectorize_train(train_step, state_axes: TrainState, chunk: int | None = None):
  """(replicated state, batches [R, ...]) -> (state, metrics [R]) of the per-replica step: all replicas
  vmapped at once (chunk None), or `chunk` at a time, vmapped, in a jax.lax.map loop inside the one step."""
  if chunk is None:
    return jax.vmap(train_step, in_axes=(state_axes, 0), out_axes=(state_axes, 0))

  def step(state, batches):
    leaves, tree = jax.tree.flatten(state)
    mapped = [a is not None for a in tree.flatten_up_to(state_axes)]
    rebuild = lambda own: tree.unflatten([next(own) if m else x for x, m in zip(leaves, mapped)])  # noqa: E731

    def one(xs):  # one replica (or a chunk, vmapped by lax.map); shared leaves are closed over
      own, batch = xs
      new, metrics = train_step(rebuild(iter(own)), batch)
      return [x for x, m in zip(tree.flatten_up_to(new), mapped) if m], metrics

    own = [x for x, m in zip(leaves, mapped) if m]
    new, metrics = jax.lax.map(one, (own, batches), batch_size=chunk if chunk > 1 else None)
    return rebuild(iter(new)), metrics

  return step


def vectorize_eval(eval_step, state_axes: TrainState):
  """(replicated params, model state, one batch for all) -> (sums [R, ...], rows [R, ...])."""
  return jax.vmap(eval_step, in_axes=(state_axes.params, state_axes.model_state, None))


def stack_batches(batches: list[dict]) -> dict:
  """[R, ...] fields of R replicas' batches, each padded at the end of every axis to the largest shape
  (batching.padded_fields: with what collate pads with)."""
  return {key: np.stack(arrays) for key, arrays, _ in batching.padded_fields(batches)}


class Batches:
  """The training batches of every replica, step by step: item i is the [R, ...] stack of each replica's
  batch i in its own data order (a grain source, like batching.TrainBatches)."""

  def __init__(self, sources: list):
    self.sources = sources

  def __len__(self):
    return len(self.sources[0])

  def __getitem__(self, i: int) -> dict:
    return stack_batches([s[i] for s in self.sources])


def summary(values) -> tuple[float, float]:
  """(mean, half-width of the 95% confidence interval of the mean: Student's t, n - 1 degrees of
  freedom); the half-width is nan for one value."""
  from scipy import stats
  x = np.asarray(values, np.float64)
  if len(x) < 2:
    return float(x.mean()), math.nan
  return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def aggregate(per_replica: list[dict]) -> dict:
  """One metrics dict of R replicas' ones: each metric's mean, `<metric>_ci` (95% half-width) and
  `<metric>_seeds` (the replicas' values, in seed order)."""
  out = {}
  for key in per_replica[0]:
    values = [float(m[key]) for m in per_replica]
    out[key], out[f"{key}_ci"] = summary(values)
    out[f"{key}_seeds"] = values
  return out


def unstack_tree(tree, n: int) -> list:
  """A tree whose leaves have the replica axis -> n trees, one per replica."""
  return [take(tree, r) for r in range(n)]


def line(metrics: dict) -> str:
  """Every metric of a dict, plain or aggregated (mean ± CI, once per metric)."""
  if not any(k.endswith("_seeds") for k in metrics):
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
  return describe([k for k in metrics if f"{k}_seeds" in metrics], metrics)


def describe(names, metrics: dict, noun: str = "seeds") -> str:
  """`accuracy 0.8512 ± 0.0043 (5 seeds)` for an aggregated metrics dict (the replicas still training)."""
  n = sum(not math.isnan(x) for x in metrics[f"{names[0]}_seeds"])
  return "  ".join(f"{k} {metrics[k]:.4f} ± {metrics[k + '_ci']:.4f}" for k in names) + f" ({n} {noun})"


def assemble(trees: dict, steps: list, own: frozenset | None = None):
  """The replicated tree whose replica r is replica r of trees[steps[r]] (trees: step -> a replicated tree;
  of params when `own` is given: their shared leaves are the same in all)."""
  flat = {s: rules.flat(t) for s, t in trees.items()}
  first = next(iter(flat.values()))
  return rules.merge({p: (jnp.stack([flat[s][p][r] for r, s in enumerate(steps)]) if own is None or p in own else x)
                      for p, x in first.items()})
