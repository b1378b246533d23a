"""The training loop: data -> jitted step -> metrics / eval -> orbax checkpoints -> test, phase by phase
(see phases.py; a run without `phases` is one phase). What runs is built by experiment.build.
"""
import math
import time
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxft import batch_schedule, faults, noise_scale, parallel, preemption, pruning, replicas, rules, runs
from jaxft import config as config_lib
from jaxft import metrics as metrics_lib
from jaxft import phases as phases_lib
from jaxft.data import batching
from jaxft.errors import JaxftError, Preempted
from jaxft.evaluate import Stopped, evaluate, feature_table
from jaxft.experiment import build, setup


def _compiles(step_fn) -> int:
  """How many executables a jitted step holds (its compile count); 0 where unknown (pmap)."""
  return step_fn._cache_size() if hasattr(step_fn, "_cache_size") else 0


def _better(value, best, lower_is_better: bool):
  return best is None or (value < best if lower_is_better else value > best)


def train(cfg, console: Console | None = None) -> dict:
  """Runs (or resumes) the experiment; returns the test metrics of the best checkpoint."""
  console = console or Console(stderr=True)
  log = console.print if jax.process_index() == 0 else (lambda *a, **k: None)
  runs.check_dir(cfg)
  # Built before the run dir is touched (a bad config leaves nothing behind); a resumed run keeps its labels' order.
  exp = build(cfg, log, run_labels=runs.resumed_labels(cfg))
  par, targets = setup(exp, log)
  with runs.for_training(cfg, log) as ckpt, preemption.Watcher() as watcher:
    return _run(exp, par, targets, ckpt, watcher, console, log)


def _warn(log, msg: str) -> None:
  log(f"[bold red]warning:[/] {escape(msg)}")


def _run(exp, par, targets, ckpt, watcher, console, log) -> dict:
  """The loop of `train`, holding the run dir's lock."""
  cfg, tcfg, task, is_main = exp.cfg, exp.cfg.train, exp.task, jax.process_index() == 0
  run_dir = Path(cfg.run_dir)
  state, data_state, record, latest = runs.resume(exp, par, targets, ckpt, log, lambda msg: _warn(log, msg))
  if is_main:
    (run_dir / "config.yaml").write_text(config_lib.dump(cfg))

  axis = par.axis_name
  # train.sweep_prune: the replicas still training (`live`) are a subset of the run's (`run_reps`); checkpoints
  # hold every replica (`whole`), a dropped one as it was when dropped.
  run_reps, prune_at = exp.replicas, pruning.steps(cfg, exp.total_steps)
  live = pruning.alive(record, len(run_reps.seeds)) if record.pruned else None
  full_state = state if live is not None else None
  state, live_targets = _narrow(exp, par, run_reps, state, live, record.phase) if live is not None else (state, targets)
  whole = lambda state: state if live is None else replicas.scatter(full_state, live, state, run_reps.own)  # noqa: E731
  eval_step = par.compile_eval(exp.eval_step(axis), live_targets[0])
  source = exp.replicas.batches(lambda seed: exp.train_batches(par.batch_shards, parallel.process_rows, seed))

  def feed(source, data_state):
    batches = iter(batching.train_dataset(source, batching.workers(cfg.data.workers)))
    if data_state is not None:
      batches.set_state(data_state)
    return batches

  batches = feed(source, data_state)
  writer = metrics_lib.MetricWriter(run_dir, enabled=is_main, resume_step=latest)
  log(f"{len(exp.phases)} phase(s), at most {exp.total_steps} steps of {tcfg.batch_size} "
      f"({len(exp.splits['train'])} train examples, {exp.task.batch_layout(exp.pack, exp.buckets)})")

  step = int(np.max(par.host_view(state).step))  # replicas step together
  progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                      disable=not is_main)

  def prune(step, state, k):
    """train.sweep_prune at `step`: the worst settings dropped; (the state of the replicas left, their steps)."""
    nonlocal live, full_state, live_targets, eval_step, source, batches
    was = live if live is not None else list(range(len(run_reps.seeds)))
    keep = pruning.survivors(run_reps.settings, was, record.best_values, cfg.train.sweep_prune["keep"],
                             exp.lower_is_better)
    full_state = whole(state)
    record.pruned = record.pruned or [None] * len(run_reps.seeds)
    for r in set(was) - set(keep):
      record.pruned[r] = step
    live = keep
    state, live_targets = _narrow(exp, par, run_reps, full_state, live, k)
    by_replica = dict(zip(was, source.sources))
    source = replicas.Batches([by_replica[r] for r in live])
    batches = feed(source, batches.get_state())
    eval_step = par.compile_eval(exp.eval_step(axis), live_targets[0])
    settings = lambda rs: pruning.distinct(run_reps.settings, rs)  # noqa: E731
    log(f"step {step}: train.sweep_prune keeps {settings(live)} of {settings(was)} settings ({len(live)} replicas)")
    return state, _phase_steps(exp, k, par, state, live_targets[k], eval_step, axis, log)

  def run_phase(k, state, step):
    """Steps through phase k until its end; returns (state, step)."""
    phase, ptcfg = exp.phases[k], exp.phases[k].cfg.train
    train_step, eval_step_k, transform = _phase_steps(exp, k, par, state, live_targets[k], eval_step, axis, log)
    single = exp.state_shapes(k).params  # one replica's
    n_train = rules.count(rules.split(single, phase.labels, "train")[0])
    end = (f"until validation {phase.until['metric'][4:]} stops improving for {phase.until['patience']} "
           f"evals, at most {phase.max_steps} steps") if phase.until else f"{phase.max_steps} steps"
    log(f"phase {phase.name}: {end}; trainable params {n_train:,} of {rules.count(single):,}"
        + (" per replica" if exp.replicas else ""))
    t_window, window_start, shapes = time.perf_counter(), step, set()
    eval_every = ptcfg.eval_every or batching.steps_for(len(exp.splits["train"]), tcfg.batch_size, 1)  # per epoch
    skipped = int(np.sum(jax.device_get(par.host_view(state).skipped)))
    grown = {1: train_step}  # train.batch_schedule: the step of batches of u units, compiled as u first comes

    def step_of(u):
      if u not in grown:
        grown[u] = par.compile_train(exp.train_step(k, axis, units=u), live_targets[k])
      return grown[u]

    while not phases_lib.ended(phase, record, step):
      u = min(record.batch_units, phase.max_steps - (step - record.phase_start))  # units of tcfg.batch_size
      step += u
      batch = transform("train")(next(batches))
      if u > 1:  # the next u training batches, one batch
        rows = math.lcm(exp.row_multiple(par.batch_shards), exp.micro_steps * u)
        batch = batch_schedule.join([batch] + [transform("train")(next(batches)) for _ in range(u - 1)], rows)
      if task.on_policy:  # the step's batch: completions sampled from the current policy, scored (grpo)
        batch = task.rollout(exp, par, state, batch, step)
      shapes.add(tuple(sorted((key, x.shape) for key, x in batch.items())))
      state, m = step_of(u)(state, par.put_batch(batch, train=True))
      if par.block_each_step:
        jax.block_until_ready(state)
      in_phase = step - record.phase_start
      every = lambda period, at=step: batch_schedule.crossed(at, u, period)  # noqa: E731 (u = 1: at % period == 0)
      last = in_phase >= phase.max_steps
      is_eval = every(eval_every, in_phase) or last or step in prune_at
      is_log, is_save = every(ptcfg.log_every), every(tcfg.checkpoint_every)
      if is_log or is_eval or is_save:
        skipped = _check_finite(state, par, tcfg, ckpt, log, skipped)
      if phase.grown and every(batch_schedule.every(cfg)):  # the batch doubles while the noise scale exceeds it
        now = par.metrics(m)
        doubled = batch_schedule.grown(cfg, record.batch_units, step, record.batch_changed, now)
        if doubled != record.batch_units:
          record.batch_units, record.batch_changed = doubled, step
          log(f"step {step}: train.batch_schedule doubles the batch to {doubled * tcfg.batch_size} (gradient noise "
              f"scale {float(now['noise_scale']):.0f} in loss weights)")
      if is_log or last:
        m = par.metrics(m)
        m = exp.replicas.metrics(m)
        m["skipped_steps"] = skipped
        dt = time.perf_counter() - t_window
        m["examples_per_s"] = (step - window_start) * tcfg.batch_size * exp.replicas.lanes / dt  # all replicas
        m["step_ms"] = 1000 * dt / (step - window_start)  # (train.batch_schedule: per batch of train.batch_size)
        m["lr"] = float((phase.grown(u)[1] if phase.grown else phase.lr)(in_phase - u))
        m["phase"], m["compiles"] = k, sum(map(_compiles, grown.values()))
        if phase.grown:
          m["batch_size"] = u * tcfg.batch_size
        writer.write(step, "train", m)
        noise = f"  noise scale {m['noise_scale']:.0f}" if "noise_scale" in m else ""
        own = "".join(f"  {key} {float(np.mean(m[key])):.3f}" for key in task.train_metrics if key in m)
        progress.update(bar, completed=step, info=f"{phase.name} loss {m['loss']:.4f}{own}  "
                        f"{m['examples_per_s']:.1f} ex/s{noise}")
        if "noise_scale" in m:
          last_noise[k] = (step, m)
        t_window, window_start = time.perf_counter(), step
      if is_eval or is_save:
        if is_eval:
          val = evaluate(exp, par, eval_step_k, state.params, state.model_state, "validation",
                         transform("validation"))
          writer.write(step, "validation", val)
          _note_best(exp, record, val, step)
          phases_lib.update_plateau(phase, record, val, task.lower_is_better)  # replicas: on their mean
          log(f"step {step} ({phase.name}): validation {exp.describe(val)}")
          if step in prune_at and pruning.distinct(run_reps.settings, exp.replicas.index) > 1:
            state, (train_step, eval_step_k, transform) = prune(step, state, k)
            grown.clear()
            grown[1] = train_step
        ckpt.save(step, par.host_view(whole(state)), batches.get_state(), record)
        t_window, window_start = time.perf_counter(), step
      faults.inject("step", step)
      if watcher.reached(step):  # SIGTERM / SIGINT: this step's checkpoint, committed, then exit
        ckpt.save(step, par.host_view(whole(state)), batches.get_state(), record)
        ckpt.wait()
        writer.close()
        raise Preempted(watcher.signum, step, f"{ckpt.directory}/{step}")
    # Recompile guard: one compile per batch shape (bucket) and phase, never more.
    if (compiles := sum(map(_compiles, grown.values()))) > len(shapes):
      _warn(log, f"phase {phase.name} compiled its step {compiles} times for {len(shapes)} batch shapes: "
            "something in the step's inputs changes between steps")
    return state, step

  last_noise = {}  # phase -> (step, metrics) of its last logged gradient noise scale
  with progress:
    bar = progress.add_task("train", total=exp.total_steps, completed=step, info="")
    for k in range(record.phase, len(exp.phases)):
      if k != record.phase:  # a new phase: new optimizer, per-param state carried over
        state = par.put_state(exp.carry_over(par.host_view(state), k), targets[k])
        if k == 1 and phases_lib.is_probe(exp.phases[0], task):  # kept: jaxft interpolate starts there
          record.probe_step = step
        record.phase, record.phase_start, record.plateau_best, record.plateau_bad = k, step, None, 0
      state, step = run_phase(k, state, step)
      progress.update(bar, total=step + sum(p.max_steps for p in exp.phases[k + 1:]))

  stop_test = watcher.testing()  # from here a signal cuts the test pass (the rerun tests again)
  faults.inject("test", step)
  for k, (at, m) in last_noise.items():
    log(noise_scale.report(exp.phases[k].name, m.get("batch_size", exp.cfg.train.batch_size), at, m))
  if record.kept() != {step}:  # else the last checkpoint commits while the test pass runs
    ckpt.wait()
  if live is not None:  # each replica's best, of the run's replicas; tested: those still training
    exp.replicas, state = run_reps, par.put_state(whole(state), targets[record.phase])
  state = runs.restore_best(exp, ckpt, par, targets, record, state, step, lambda msg: _warn(log, msg))
  if live is not None:
    state = _narrow(exp, par, run_reps, state, live, record.phase)[0]
  if record.best_step is None:  # no validation recorded (a resumed finished run), or the best is damaged
    val = evaluate(exp, par, eval_step, state.params, state.model_state, "validation")
    record.best_step, record.best_value = step, val[exp.best_metric]
    ckpt.save(step, par.host_view(whole(state)), batches.get_state(), record)
    ckpt.wait()
  try:
    test = evaluate(exp, par, eval_step, state.params, state.model_state, "test", stop=stop_test)
  except Stopped:
    ckpt.wait()
    writer.close()
    raise Preempted(watcher.signum, step, f"{ckpt.directory}/{ckpt.latest_step()}") from None
  writer.write(record.best_step, "test", test)
  writer.close()
  ckpt.close()
  where = (f"each replica's best checkpoint (steps {', '.join(map(str, record.best_steps))})" if exp.replicas else
           f"the best checkpoint (step {record.best_step}, validation {exp.best_metric} {record.best_value:.4f})")
  log(f"test metrics from {where}")
  if is_main:
    print("test " + exp.describe(test), flush=True)
    if exp.replicas.swept:
      print("\n".join(run_reps.sweep_table(exp.best_metric, exp.lower_is_better, record.best_values, test,
                                            record.pruned)), flush=True)
  return test



def _narrow(exp, par, run_reps, full_state, live: list, k: int):
  """exp narrowed to the run's replicas `live` (train.sweep_prune): (their part of the run's state on the
  devices, the restore targets of that many replicas per phase)."""
  exp.replicas = run_reps.subset(live)
  targets = [exp.replicas.abstract_state(par, exp.state_shapes(j)) for j in range(len(exp.phases))]
  return par.put_state(replicas.gather(full_state, live, run_reps.own), targets[k]), targets


def _note_best(exp, record, val: dict, step: int) -> None:
  """Records `step` as the best where validation's train.best_metric improved: its mean's, and each
  replica's own."""
  metric, lower = exp.best_metric, exp.lower_is_better
  if _better(val[metric], record.best_value, lower):
    record.best_step, record.best_value = step, val[metric]
  exp.replicas.note_best(record, val.get(f"{metric}_seeds"), step, lambda new, old: _better(new, old, lower))


def _check_finite(state, par, tcfg, ckpt, log, reported: int) -> int:
  """The count of steps whose update was dropped for a non-finite loss or gradient; with
  train.on_nonfinite=stop the first one ends the run (params stay those of the step before)."""
  # only the two counters (pmap: one eager slice each, not one per leaf of the whole state at every log step)
  skipped, first = jax.device_get(par.host_view((state.skipped, state.first_skipped)))  # replicas: one each
  skipped, first = int(np.sum(skipped)), int(np.min(np.where(first >= 0, first, np.iinfo(np.int32).max)))
  if skipped and tcfg.on_nonfinite == "stop":
    ckpt.wait()
    latest = ckpt.latest_step()
    raise JaxftError(f"step {first}: the loss or gradient norm is not finite (nan / inf); its update was not "
                     f"applied and the run stops (train.on_nonfinite=stop). Newest checkpoint: "
                     f"{f'{ckpt.directory}/{latest}' if latest is not None else 'none'}. Lower optim.lr, or set "
                     f"train.on_nonfinite=skip_step to go on without such steps")
  if skipped > reported:
    _warn(log, f"{skipped} step(s) so far had a non-finite loss or gradient norm (the first: step {first}); "
          "their updates were skipped (train.on_nonfinite=skip_step)")
  return skipped


def _phase_steps(exp, k, par, state, target, eval_step, axis, log):
  """(compiled train step, compiled eval step, batch transform per split) for phase k. With
  train.cache_features the frozen backbone runs once per example here, and the steps see only the head."""
  phase = exp.phases[k]
  if not phase.cfg.train.cache_features:
    return par.compile_train(exp.train_step(k, axis), target), eval_step, lambda split: lambda b: b
  features = par.compile_eval(exp.cache_features, target)
  t0 = time.perf_counter()
  cached = {s: feature_table(exp, par, features, state.params, state.model_state, s) for s in ("train", "validation")}
  log(f"phase {phase.name}: cached {cached['train'].shape[1:]} features of the train and validation splits in "
      f"{time.perf_counter() - t0:.1f} s")

  def transform(split):
    def fed(b):  # the task's batch fields stay (labels, weights); the backbone's inputs are replaced
      out = {key: v for key, v in b.items() if key not in exp.backbone.inputs}
      return {**out, "features": cached[split][np.maximum(b["index"], 0)]}
    return fed

  train_step = par.compile_train(exp.train_step(k, axis, cached=True), target)
  return train_step, par.compile_eval(exp.eval_step(axis, cached=True), target), transform
