"""The training loop: data -> jitted step -> metrics / eval -> orbax checkpoints -> test.

`build` assembles everything a run needs (also used by `jaxft inspect`); `train` runs it, phase by
phase (see phases.py; a run without `phases` is one phase).
"""
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxft import config as config_lib
from jaxft import lora, parallel, phases as phases_lib, rules
from jaxft import metrics as metrics_lib
from jaxft.checkpoint import Checkpointer
from jaxft.data import pipeline, text
from jaxft.models import load_model
from jaxft.step import TrainState, init_state, make_eval_step, make_train_step


@dataclasses.dataclass
class Experiment:
  cfg: Any
  model: Any
  label_names: list[str]
  splits: dict  # split -> pipeline.Encoded
  phases: list  # phases_lib.Phase
  state: TrainState  # initial, for phase 0

  labels = property(lambda self: self.phases[0].labels)  # the first phase's, for single-phase runs
  tx = property(lambda self: self.phases[0].tx)
  lr = property(lambda self: self.phases[0].lr)
  total_steps = property(lambda self: sum(p.max_steps for p in self.phases))


def build(cfg, log=print) -> Experiment:
  raw, label_names = text.load_splits(cfg.data)
  model = load_model(cfg, num_labels=len(label_names), log=log)
  params = jax.tree.map(lambda x: x.astype(cfg.precision.params) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        model.params)
  if cfg.lora.targets:
    params = lora.add_adapters(params, cfg.lora, cfg.seed)
    model = dataclasses.replace(model, apply=lora.wrap(model.apply, cfg.lora))
  model = dataclasses.replace(model, params=params)
  splits = {k: pipeline.encode(model.tokenizer, t, y, cfg.data.max_length) for k, (t, y) in raw.items()}
  phases = phases_lib.build(cfg, params, len(splits["train"].labels), model.features is not None)
  for phase in phases:
    phases_lib.check_cacheable(phase, model)
  state = init_state(params, phases[0].tx, cfg.seed)
  return Experiment(cfg, model, label_names, splits, phases, state)


def _split_batches(par, data, cfg, pad_id, transform=lambda b: b):
  """(host batch, device batch) over a whole split, in (padded) eval batches; each host feeds its rows."""
  rows = parallel.process_rows(cfg.train.eval_batch_size)
  for batch in pipeline.eval_batches(data, cfg.train.eval_batch_size, cfg.data.buckets, pad_id):
    yield batch, par.put_batch({k: v[rows] for k, v in transform(batch).items()})


def evaluate(par, eval_step, params, data, cfg, pad_id, transform=lambda b: b) -> dict:
  """Metrics over a whole split."""
  sums = None
  for _, batch in _split_batches(par, data, cfg, pad_id, transform):
    out = eval_step(params, batch)
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  sums = par.metrics(sums)
  return metrics_lib.from_confusion(sums["confusion"], sums["loss_sum"], sums["count"])


def feature_table(par, features, params, data, cfg, pad_id) -> np.ndarray:
  """[N, D] backbone features of every example of a split, computed once (eval mode)."""
  rows, table = parallel.process_rows(cfg.train.eval_batch_size), None
  for batch, device_batch in _split_batches(par, data, cfg, pad_id):
    out = np.asarray(features(params, device_batch))
    out = out.reshape(-1, out.shape[-1])  # pmap: [devices, rows, D]
    index = batch["index"][rows] if par.pmap else batch["index"]
    table = np.zeros((len(data.labels), out.shape[-1]), np.float32) if table is None else table
    table[index[index >= 0]] = out[index >= 0]
  return table


def _compiles(step_fn) -> int:
  """How many executables a jitted step holds (its compile count); 0 where unknown (pmap)."""
  return step_fn._cache_size() if hasattr(step_fn, "_cache_size") else 0


def _better(value, best, mode):
  return best is None or (value > best if mode == "max" else value < best)


def train(cfg, console: Console | None = None) -> dict:
  """Runs (or resumes) the experiment; returns the test metrics of the best checkpoint."""
  console = console or Console(stderr=True)
  is_main = jax.process_index() == 0
  log = console.print if is_main else (lambda *a, **k: None)
  run_dir = Path(cfg.run_dir)
  ckpt_dir = run_dir / "checkpoints"
  if not cfg.resume and ckpt_dir.exists():
    log(f"--no-resume: removing the previous checkpoints in {ckpt_dir}")
    if is_main:
      shutil.rmtree(ckpt_dir)
  run_dir.mkdir(parents=True, exist_ok=True)

  exp = build(cfg, log)
  tcfg = exp.cfg.train
  par = parallel.Parallel(cfg, parallel.make_mesh(cfg.parallel.mesh))
  log(parallel.describe(par.mesh) + f", backend {cfg.parallel.backend}")
  pad_id = exp.model.tokenizer.pad_token_id or 0
  mode = "min" if tcfg.best_metric == "loss" else "max"
  ckpt = Checkpointer(ckpt_dir, tcfg.keep)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.state.params)
  # What checkpoints of phase k restore onto: its optimizer's state, on this mesh's shardings.
  targets = [par.abstract_state(jax.eval_shape(lambda p, tx=ph.tx: init_state(p, tx, cfg.seed), shapes))
             for ph in exp.phases]

  meta = {"best_step": None, "best_value": None, "phase": 0, "phase_start": 0, "plateau": None}

  def restore(step):
    k = ckpt.meta(step).get("phase", 0)
    state, data_state, saved = ckpt.restore(step, targets[k])
    return (par.put_state(state, targets[k]) if par.pmap else state), data_state, {**meta, **saved}

  data_state = None
  if (latest := ckpt.latest_step()) is not None:
    state, data_state, meta = restore(latest)
    log(f"resuming from {ckpt_dir}/{latest} in phase {exp.phases[meta['phase']].name} (best so far: step "
        f"{meta['best_step']}, validation {tcfg.best_metric} {meta['best_value']})")
  else:
    state = par.put_state(exp.state, targets[0])
  exp.state = None  # the devices hold the state now
  if is_main:
    (run_dir / "config.yaml").write_text(config_lib.dump(cfg))

  axis = "batch" if par.pmap else None
  micro_steps = tcfg.batch_size // (tcfg.micro_batch_size or tcfg.batch_size)
  eval_step = par.compile_eval(make_eval_step(exp.model.apply, len(exp.label_names), axis), targets[0])
  dataset = pipeline.train_dataset(exp.splits["train"], tcfg.batch_size, exp.total_steps, cfg.seed,
                                   cfg.data.buckets, pad_id, parallel.process_rows(tcfg.batch_size),
                                   cfg.data.sort_window)
  batches = iter(dataset)
  if data_state is not None:
    batches.set_state(data_state)
  writer = metrics_lib.MetricWriter(run_dir, enabled=is_main)
  log(f"{len(exp.phases)} phase(s), at most {exp.total_steps} steps of {tcfg.batch_size} "
      f"({len(exp.splits['train'].labels)} train examples)")

  step = int(par.host_view(state).step)
  progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                      disable=not is_main)

  def run_phase(k, state, step):
    """Steps through phase k until its end; returns (state, step)."""
    phase, ptcfg = exp.phases[k], exp.phases[k].cfg.train
    train_step, eval_step_k, transform = _phase_steps(exp, phase, par, state, targets[k], eval_step, axis,
                                                      micro_steps, pad_id, log)
    n_train = rules.count(rules.split(targets[k].params, phase.labels, "train")[0])
    end = (f"until validation {phase.until['metric'][4:]} stops improving for {phase.until['patience']} "
           f"evals, at most {phase.max_steps} steps") if phase.until else f"{phase.max_steps} steps"
    log(f"phase {phase.name}: {end}; trainable params {n_train:,} of {rules.count(targets[k].params):,}")
    t_window, window_start, shapes = time.perf_counter(), step, set()
    while not phases_lib.ended(phase, meta, step):
      step += 1
      batch = transform("train")(next(batches))
      shapes.add(tuple(sorted((key, x.shape) for key, x in batch.items())))
      state, m = train_step(state, par.put_batch(batch))
      if par.block_each_step:
        jax.block_until_ready(state)
      in_phase = step - meta["phase_start"]
      last = in_phase == phase.max_steps
      if step % ptcfg.log_every == 0 or last:
        m = par.metrics(m)
        dt = time.perf_counter() - t_window
        m["examples_per_s"] = (step - window_start) * tcfg.batch_size / dt
        m["step_ms"] = 1000 * dt / (step - window_start)
        m["lr"] = float(phase.lr(in_phase - 1))
        m["phase"], m["compiles"] = k, _compiles(train_step)
        writer.write(step, "train", m)
        progress.update(task, completed=step, info=f"{phase.name} loss {m['loss']:.4f}  "
                        f"{m['examples_per_s']:.1f} ex/s")
        t_window, window_start = time.perf_counter(), step
      is_eval = in_phase % ptcfg.eval_every == 0 or last
      if is_eval or step % tcfg.checkpoint_every == 0:
        if is_eval:
          val = evaluate(par, eval_step_k, state.params, exp.splits["validation"], cfg, pad_id,
                         transform("validation"))
          writer.write(step, "validation", val)
          if _better(val[tcfg.best_metric], meta["best_value"], mode):
            meta.update(best_step=step, best_value=val[tcfg.best_metric])
          phases_lib.update_plateau(phase, meta, val)
          log(f"step {step} ({phase.name}): validation loss {val['loss']:.4f}  accuracy {val['accuracy']:.4f}"
              f"  macro_f1 {val['macro_f1']:.4f}")
        ckpt.save(step, par.host_view(state), batches.get_state(), meta)
        t_window, window_start = time.perf_counter(), step
    # Recompile guard: one compile per batch shape (bucket) and phase, never more.
    if (compiles := _compiles(train_step)) > len(shapes):
      log(f"[bold red]warning:[/] phase {phase.name} compiled its step {compiles} times for {len(shapes)} "
          f"batch shapes: something in the step's inputs changes between steps")
    return state, step

  try:
    with progress:
      task = progress.add_task("train", total=exp.total_steps, completed=step, info="")
      for k in range(meta["phase"], len(exp.phases)):
        if k != meta["phase"]:  # a new phase: new optimizer, per-param state carried over
          state = par.put_state(phases_lib.carry_over(par.host_view(state), exp.phases[k].tx), targets[k])
          meta.update(phase=k, phase_start=step, plateau=None)
        state, step = run_phase(k, state, step)
        progress.update(task, total=step + sum(p.max_steps for p in exp.phases[k + 1:]))
  except KeyboardInterrupt:
    log("interrupted: waiting for checkpoints in flight; run the same command to resume")
    ckpt.wait()
    raise
  ckpt.wait()

  if meta["best_step"] is None:  # resumed a finished run whose validation was never recorded
    val = evaluate(par, eval_step, state.params, exp.splits["validation"], cfg, pad_id)
    meta.update(best_step=step, best_value=val[tcfg.best_metric])
    ckpt.save(step, par.host_view(state), batches.get_state(), meta)
    ckpt.wait()
  if meta["best_step"] != step:
    state = restore(meta["best_step"])[0]
  test = evaluate(par, eval_step, state.params, exp.splits["test"], cfg, pad_id)
  writer.write(meta["best_step"], "test", test)
  writer.close()
  ckpt.close()
  log(f"test metrics from the best checkpoint (step {meta['best_step']}, validation "
      f"{tcfg.best_metric} {meta['best_value']:.4f})")
  if is_main:
    print(f"test accuracy {test['accuracy']:.3f}  macro_f1 {test['macro_f1']:.3f}", flush=True)
  return test


def _phase_steps(exp, phase, par, state, target, eval_step, axis, micro_steps, pad_id, log):
  """(compiled train step, compiled eval step, batch transform per split) for one phase. With
  train.cache_features the frozen backbone runs once per example here, and the steps see only the head."""
  cfg, apply, cached = exp.cfg, exp.model.apply, {}
  if phase.cfg.train.cache_features:
    features = par.compile_eval(exp.model.features, target)
    t0 = time.perf_counter()
    cached = {s: feature_table(par, features, state.params, exp.splits[s], cfg, pad_id)
              for s in ("train", "validation")}
    log(f"phase {phase.name}: cached {cached['train'].shape[1]}-dim features of the train and validation "
        f"splits in {time.perf_counter() - t0:.1f} s")

    def apply(params, batch, train=False, rng=None):
      return exp.model.head(params, batch["features"], train, rng)

    eval_step = par.compile_eval(make_eval_step(apply, len(exp.label_names), axis), target)

  def transform(split):
    if not cached:
      return lambda b: b
    return lambda b: {"features": cached[split][np.maximum(b["index"], 0)], "labels": b["labels"],
                      "weights": b["weights"]}

  train_step = par.compile_train(make_train_step(apply, phase.tx, phase.labels, phase.cfg.train.dropout, axis,
                                                 micro_steps), target)
  return train_step, eval_step, transform
