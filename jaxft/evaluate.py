"""Evaluation over a whole split (the task's eval sums and per-example rows -> its finalize), and the
cached-feature tables of head-only phases. Every example is seen exactly once; each host feeds its rows."""
import jax
import numpy as np

from jaxft import parallel, runs
from jaxft.generate import generation_metrics


def split_batches(exp, par, split: str, transform=None):
  """(global host batch, device batch) over a whole split, in (padded or packed) eval batches."""
  rows = parallel.process_rows(exp.cfg.train.eval_batch_size)
  for batch in exp.eval_batches(split):
    fed = transform(batch) if transform else batch
    yield batch, par.put_batch({k: v[rows] for k, v in fed.items()})


class Stopped(Exception):
  """`stop()` said to stop before the split was done (a signal during the test pass)."""


def evaluate(exp, par, eval_step, params, model_state, split: str, transform=None, stop=None) -> dict:
  """The task's metrics over `split` (eval_step from Experiment.eval_step, compiled by par). A seed-
  vectorised run's are each replica's, aggregated (replicas.aggregate: the mean under each metric's name).
  stop: asked before each batch (and before generating); True raises Stopped."""
  reps = exp.replicas
  sums, kept = None, [{} for _ in range(reps.lanes)]
  n = len(exp.splits[split])
  stop = stop or (lambda: False)
  for batch, device_batch in split_batches(exp, par, split, transform):
    if stop():
      raise Stopped
    out, rows = eval_step(params, model_state, device_batch)
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    if rows:
      rows, index = par.metrics(rows), batch["index"]
      for lane, lane_rows in enumerate(reps.unstack(rows)):
        for name, x in lane_rows.items():  # [B, ...] or, packed, [R, K, ...] like index
          kept[lane].setdefault(name, [None] * n)
          x = x.reshape((index.size,) + x.shape[index.ndim:])
          for r in np.flatnonzero(index.reshape(-1) >= 0):
            kept[lane][name][index.flat[r]] = x[r]
  sums = par.metrics(sums)
  if stop():
    raise Stopped
  return reps.merge([_finalize(exp, par, lane_sums, lane_kept, lane_params, lane_state, split)
                     for lane_sums, lane_kept, (lane_params, lane_state)
                     in zip(reps.unstack(sums), kept, reps.each(params, model_state), strict=True)])


def _finalize(exp, par, sums, kept, params, model_state, split: str) -> dict:
  metrics = exp.task.finalize(sums, kept, exp.splits[split])
  if exp.task.generates:
    metrics.update(generation_metrics(exp, params, model_state, split, par))
  return metrics


def feature_table(exp, par, features, params, model_state, split: str) -> np.ndarray:
  """[N, ...] head inputs of every example of a split, computed once (eval mode)."""
  rows, table = parallel.process_rows(exp.cfg.train.eval_batch_size), None
  for batch, device_batch in split_batches(exp, par, split):
    out, index = par.per_example(features(params, model_state, device_batch), batch["index"], rows)
    out = out.reshape((index.size,) + out.shape[index.ndim:])  # index: [B] or, packed, [R, K]
    index = index.reshape(-1)
    table = np.zeros((len(exp.splits[split]),) + out.shape[1:], np.float32) if table is None else table
    table[index[index >= 0]] = out[index >= 0]
  return table


def evaluate_run(cfg, split: str = "test", step: int | None = None, log=print) -> dict:
  """`jaxft eval`: the task's metrics on `split` for checkpoint `step` of the run (default: its best),
  or, when the run has no checkpoints, for the pretrained model as loaded (a zero-shot baseline)."""
  exp, par, targets, state = runs.open_state(cfg, step, "evaluating", log)
  eval_step = par.compile_eval(exp.eval_step(par.axis_name), targets[0])
  return evaluate(exp, par, eval_step, state.params, state.model_state, split)
