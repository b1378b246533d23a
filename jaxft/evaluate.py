"""Evaluation over a whole split (the task's eval sums and per-example rows -> its finalize), and the
cached-feature tables of head-only phases. Every example is seen exactly once; each host feeds its rows."""
from pathlib import Path

import jax
import numpy as np

from jaxft import parallel, replicas
from jaxft.checkpoint import Checkpointer
from jaxft.errors import JaxftError
from jaxft.experiment import build, restore, restore_best, setup


def split_batches(exp, par, split: str, transform=None):
  """(global host batch, device batch) over a whole split, in (padded or packed) eval batches."""
  rows = parallel.process_rows(exp.cfg.train.eval_batch_size)
  for batch in exp.eval_batches(split):
    fed = transform(batch) if transform else batch
    yield batch, par.put_batch({k: v[rows] for k, v in fed.items()})


def evaluate(exp, par, eval_step, params, model_state, split: str, transform=None) -> dict:
  """The task's metrics over `split` (eval_step from Experiment.eval_step, compiled by par). A seed-
  vectorised run's are each replica's, aggregated (replicas.aggregate: the mean under each metric's name)."""
  lanes = len(exp.seeds) or 1
  sums, kept = None, [{} for _ in range(lanes)]
  n = len(exp.splits[split])
  for batch, device_batch in split_batches(exp, par, split, transform):
    out, rows = eval_step(params, model_state, device_batch)
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    if rows:
      rows, index = par.metrics(rows), batch["index"]
      for lane, lane_rows in enumerate(replicas.unstack_tree(rows, lanes) if exp.seeds else [rows]):
        for name, x in lane_rows.items():  # [B, ...] or, packed, [R, K, ...] like index
          kept[lane].setdefault(name, [None] * n)
          x = x.reshape((index.size,) + x.shape[index.ndim:])
          for r in np.flatnonzero(index.reshape(-1) >= 0):
            kept[lane][name][index.flat[r]] = x[r]
  sums = par.metrics(sums)
  if not exp.seeds:
    return _finalize(exp, par, sums, kept[0], params, model_state, split)
  return replicas.aggregate([_finalize(exp, par, replicas.take(sums, r), kept[r], replicas.take(params, r, exp.own),
                                       replicas.take(model_state, r), split) for r in range(lanes)])


def _finalize(exp, par, sums, kept, params, model_state, split: str) -> dict:
  metrics = exp.task.finalize(sums, kept, exp.splits[split])
  if exp.task.generates:
    from jaxft.generate import generation_metrics
    metrics.update(generation_metrics(exp, params, model_state, split, par))
  return metrics


def feature_table(exp, par, features, params, model_state, split: str) -> np.ndarray:
  """[N, ...] head inputs of every example of a split, computed once (eval mode)."""
  rows, table = parallel.process_rows(exp.cfg.train.eval_batch_size), None
  for batch, device_batch in split_batches(exp, par, split):
    out = np.asarray(features(params, model_state, device_batch))
    index = batch["index"][rows] if par.pmap else batch["index"]  # [B] or, packed, [R, K]
    out = out.reshape((index.size,) + out.shape[index.ndim + (1 if par.pmap else 0):])  # pmap: [devices, ...]
    index = index.reshape(-1)
    table = np.zeros((len(exp.splits[split]),) + out.shape[1:], np.float32) if table is None else table
    table[index[index >= 0]] = out[index >= 0]
  return table


def run_state(cfg, step: int | None = None, using: str = "evaluating", log=print):
  """(experiment, Parallel, restore targets, state on the devices) of checkpoint `step` of the run (default:
  its best), or, when the run has no checkpoints, of the model as loaded. `using` names the use in the log."""
  exp = build(cfg, log)
  par, targets = setup(exp, log)
  ckpt_dir = Path(cfg.run_dir) / "checkpoints"
  ckpt = Checkpointer(ckpt_dir, cfg.train.keep) if ckpt_dir.is_dir() else None
  latest = ckpt.latest_step() if ckpt else None
  if latest is None:
    if step is not None:
      raise JaxftError(f"--step {step}: no checkpoints in {ckpt_dir}")
    untrained = " (a new head is untrained)" if exp.task.head_key is not None else ""
    log(f"no checkpoints in {ckpt_dir}: {using} the model as loaded{untrained}")
    return exp, par, targets, par.put_state(exp.state, targets[0])
  if step is not None and step not in ckpt.steps():
    raise JaxftError(f"--step {step}: no such checkpoint in {ckpt.directory} "
                     f"(steps: {', '.join(map(str, ckpt.steps()))})")
  if step is None and exp.seeds:  # each replica at its own best
    state, record = restore(ckpt, par, targets, latest)[::2]
    state = restore_best(exp, ckpt, par, targets, record, state, latest, log)
    log(f"{using} each replica's best checkpoint in {ckpt.directory} (steps {', '.join(map(str, record.best_steps))})")
  else:
    step = step if step is not None else (ckpt.record(latest).best_step or latest)
    state = restore(ckpt, par, targets, step)[0]
    log(f"{using} checkpoint {ckpt.directory}/{step}")
  ckpt.close()
  return exp, par, targets, state


def evaluate_run(cfg, split: str = "test", step: int | None = None, log=print) -> dict:
  """`jaxft eval`: the task's metrics on `split` for checkpoint `step` of the run (default: its best),
  or, when the run has no checkpoints, for the pretrained model as loaded (a zero-shot baseline)."""
  exp, par, targets, state = run_state(cfg, step, "evaluating", log)
  eval_step = par.compile_eval(exp.eval_step("batch" if par.pmap else None), targets[0])
  return evaluate(exp, par, eval_step, state.params, state.model_state, split)
