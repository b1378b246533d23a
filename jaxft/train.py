"""The training loop: data -> jitted step -> metrics / eval -> orbax checkpoints -> test.

`build` assembles everything a run needs (also used by `jaxft inspect`); `train` runs it.
"""
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxft import config as config_lib
from jaxft import metrics as metrics_lib
from jaxft import lora, optim, parallel, rules
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
  labels: Any  # 'train' / 'frozen' per param
  tx: Any
  lr: Any
  total_steps: int
  state: TrainState


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
  labels = rules.freeze_labels(cfg, model.params)
  total_steps = pipeline.steps_for(len(splits["train"].labels), cfg.train.batch_size, cfg.train.epochs)
  tx, lr = optim.make_optimizer(cfg.optim, model.params, labels, total_steps, cfg.train.batch_size)
  state = init_state(model.params, tx, cfg.seed)
  return Experiment(cfg, model, label_names, splits, labels, tx, lr, total_steps, state)


def evaluate(par, eval_step, params, data, cfg, pad_id) -> dict:
  """Metrics over a whole split; each host feeds its rows of every (padded) eval batch."""
  rows, sums = parallel.process_rows(cfg.train.eval_batch_size), None
  for batch in pipeline.eval_batches(data, cfg.train.eval_batch_size, cfg.data.buckets, pad_id):
    out = eval_step(params, par.put_batch({k: v[rows] for k, v in batch.items()}))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  sums = par.metrics(sums)
  return metrics_lib.from_confusion(sums["confusion"], sums["loss_sum"], sums["count"])


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
  target = par.abstract_state(exp.state)  # what checkpoints restore onto: this mesh's shardings

  def restore(step):
    state, data_state, meta = ckpt.restore(step, target)
    return (par.put_state(state, target) if par.pmap else state), data_state, meta

  meta = {"best_step": None, "best_value": None}
  data_state = None
  if (latest := ckpt.latest_step()) is not None:
    state, data_state, meta = restore(latest)
    log(f"resuming from {ckpt_dir}/{latest} (best so far: step {meta['best_step']}, "
        f"validation {tcfg.best_metric} {meta['best_value']})")
  else:
    state = par.put_state(exp.state, target)
  exp.state = None  # the devices hold the state now
  if is_main:
    (run_dir / "config.yaml").write_text(config_lib.dump(cfg))

  axis = "batch" if par.pmap else None
  micro_steps = tcfg.batch_size // (tcfg.micro_batch_size or tcfg.batch_size)
  train_step = par.compile_train(make_train_step(exp.model.apply, exp.tx, exp.labels, tcfg.dropout, axis,
                                                 micro_steps), target)
  eval_step = par.compile_eval(make_eval_step(exp.model.apply, len(exp.label_names), axis), target)
  dataset = pipeline.train_dataset(exp.splits["train"], tcfg.batch_size, exp.total_steps, cfg.seed,
                                   cfg.data.buckets, pad_id, rows=parallel.process_rows(tcfg.batch_size))
  batches = iter(dataset)
  if data_state is not None:
    batches.set_state(data_state)
  writer = metrics_lib.MetricWriter(run_dir, enabled=is_main)
  n_train = rules.count(rules.split(target.params, exp.labels, "train")[0])
  log(f"{exp.total_steps} steps of {tcfg.batch_size} ({len(exp.splits['train'].labels)} train examples, "
      f"{tcfg.epochs:g} epochs); trainable params {n_train:,} of {rules.count(target.params):,}")

  def run_eval(step):
    nonlocal meta
    val = evaluate(par, eval_step, state.params, exp.splits["validation"], cfg, pad_id)
    writer.write(step, "validation", val)
    if _better(val[tcfg.best_metric], meta["best_value"], mode):
      meta = {"best_step": step, "best_value": val[tcfg.best_metric]}
    log(f"step {step}: validation loss {val['loss']:.4f}  accuracy {val['accuracy']:.4f}  "
        f"macro_f1 {val['macro_f1']:.4f}")
    return val

  start = int(par.host_view(state).step)
  progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                      disable=not is_main)
  try:
    with progress:
      task = progress.add_task("train", total=exp.total_steps, completed=start, info="")
      t_window, window_start = time.perf_counter(), start
      for step in range(start + 1, exp.total_steps + 1):
        state, m = train_step(state, par.put_batch(next(batches)))
        if par.block_each_step:
          jax.block_until_ready(state)
        if step % tcfg.log_every == 0 or step == exp.total_steps:
          m = par.metrics(m)
          dt = time.perf_counter() - t_window
          m["examples_per_s"] = (step - window_start) * tcfg.batch_size / dt
          m["step_ms"] = 1000 * dt / (step - window_start)
          m["lr"] = float(exp.lr(step - 1))
          writer.write(step, "train", m)
          progress.update(task, completed=step, info=f"loss {m['loss']:.4f}  "
                          f"{m['examples_per_s']:.1f} ex/s")
          t_window, window_start = time.perf_counter(), step
        is_eval = step % tcfg.eval_every == 0 or step == exp.total_steps
        if is_eval or step % tcfg.checkpoint_every == 0:
          if is_eval:
            run_eval(step)
          ckpt.save(step, par.host_view(state), batches.get_state(), meta)
          t_window, window_start = time.perf_counter(), step
  except KeyboardInterrupt:
    log("interrupted: waiting for checkpoints in flight; run the same command to resume")
    ckpt.wait()
    raise
  ckpt.wait()

  if meta["best_step"] is None:  # resumed a finished run whose validation was never recorded
    run_eval(exp.total_steps)
    ckpt.save(exp.total_steps, par.host_view(state), batches.get_state(), meta)
  if meta["best_step"] != exp.total_steps:
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
