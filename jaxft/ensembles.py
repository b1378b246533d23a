"""Weight-space ensembles of a finished run, evaluated with its own eval step:

* `jaxft interpolate`: WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"),
  theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1 from the pretrained weights theta_0 (with the
  run's linear-probe head) to the fine-tuned ones theta_1, on validation and test;
* `jaxft soup`: model soups (Wortsman et al. 2022, "Model soups") over the replicas of a seed-vectorised
  run: the uniform average of every replica's best weights, and the greedy soup that adds replicas in
  order of validation score while the score does not drop.
"""
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft import hparams, lora, replicas, rules, runs
from jaxft.errors import JaxftError
from jaxft.evaluate import evaluate
from jaxft.experiment import save_model

SPLITS = ("validation", "test")


@jax.jit
def mix(a, b, alpha):
  """(1 - alpha) * a + alpha * b on floating leaves (others: b's)."""
  return jax.tree.map(lambda x, y: (1 - alpha) * x + alpha * y if jnp.issubdtype(y.dtype, jnp.floating) else y, a, b)


def theta_zero(exp, params, model_state, probe_params=None):
  """WiSE-FT's start, shaped like the fine-tuned `params` (replicated too): the backbone as loaded, the head
  of the linear probe (`probe_params`: the run's head-only first phase) or, without one, the fine-tuned head,
  and LoRA adapters that add nothing (lora_b = 0, lora_a the fine-tuned one, so the weight change
  interpolates linearly). BatchNorm statistics: the checkpoint's as loaded."""
  base, head = rules.flat(exp.init_params(exp.cfg.seed)), exp.task.head_key
  probe = rules.flat(probe_params) if probe_params is not None else {}

  def start(p, x):
    if head is not None and p.startswith(head + "/"):
      return probe.get(p, x)
    if lora.is_adapter(p):
      return jnp.zeros_like(x) if p.endswith("lora_b") else x
    return jax.device_put(jnp.broadcast_to(jnp.asarray(base[p], x.dtype), x.shape), x.sharding)

  params0 = rules.merge({p: start(p, x) for p, x in rules.flat(params).items()})
  model_state, swept = hparams.split(model_state)  # (a sweep's values stay the run's)
  state0 = jax.tree.map(lambda b, x: jax.device_put(jnp.broadcast_to(jnp.asarray(b, x.dtype), x.shape), x.sharding),
                        exp.backbone.state, model_state) if model_state else model_state
  return params0, ({**state0, hparams.KEY: swept} if swept else state0)


def interpolate(cfg, alphas: list[float], log=print) -> list[dict]:
  """`jaxft interpolate`: metrics of theta(alpha) on validation and test for each alpha, written to
  RUN_DIR/interpolate.jsonl and drawn into RUN_DIR/interpolate.png; returns the rows."""
  probe_step = runs.record(cfg).probe_step
  exp, par, targets, state = runs.open_state(cfg, None, "interpolating from", log, required=True)
  probe = None
  if probe_step is not None:
    with runs.checkpoints(cfg) as ckpt:
      probe = runs.restore(ckpt, par, targets, probe_step)[0].params
    log(f"theta_0: the backbone as loaded, with the linear probe's head (checkpoint {probe_step})")
  else:
    log("theta_0: the backbone as loaded, with the fine-tuned head (the run has no head-only first phase)")
  params0, state0 = theta_zero(exp, state.params, state.model_state, probe)
  eval_step = par.compile_eval(exp.eval_step(par.axis_name), targets[0])
  rows = []
  for alpha in alphas:
    params, model_state = mix(params0, state.params, alpha), mix(state0, state.model_state, alpha)
    for split in SPLITS:
      metrics = evaluate(exp, par, eval_step, params, model_state, split)
      rows.append({"alpha": alpha, "split": split, **metrics})
      log(f"alpha {alpha:g}: {split} {exp.describe(metrics)}")
  run_dir = Path(cfg.run_dir)
  _write_jsonl(run_dir / "interpolate.jsonl", rows)
  log(f"wrote {run_dir / 'interpolate.jsonl'}")
  from jaxft import plots
  try:
    log(f"wrote {plots.interpolation(rows, exp.best_metric, run_dir / 'interpolate.png', f'WiSE-FT: {run_dir}')}")
  except JaxftError as e:  # matplotlib missing: the numbers are written all the same
    log(f"no interpolate.png: {e}")
  return rows


def soup(cfg, out_dir=None, log=print) -> list[dict]:
  """`jaxft soup`: each replica's best weights, their uniform soup and their greedy soup on validation and
  test (RUN_DIR/soup.jsonl); `out_dir`: the greedy soup written as a model dir (as `jaxft export` does)."""
  if out_dir is not None and Path(out_dir).exists() and any(Path(out_dir).iterdir()):
    raise JaxftError(f"soup directory {out_dir} exists and is not empty; choose a new one")
  exp, par, targets, state = runs.open_state(cfg, None, "souping", log, required=True)
  if not exp.replicas:
    raise JaxftError(f"jaxft soup: {cfg.run_dir} is a single run; a soup mixes the replicas of a train.seeds run")
  single = dataclasses.replace(exp, replicas=replicas.Replicas(cfg.seed))
  target = par.abstract_state(single.state_shapes(0))
  eval_step = par.compile_eval(single.eval_step(), target)
  n = len(exp.replicas.seeds)
  shardings = jax.tree.map(lambda x: x.sharding, (target.params, target.model_state))

  def mean_of(members):
    """The average of some replicas' best params and model state, on the devices."""
    chosen = [exp.replicas.one(state, r) for r in members]
    params, states = [s.params for s in chosen], [s.model_state for s in chosen]
    average = lambda *xs: sum(xs) / len(xs)  # noqa: E731
    return jax.device_put((jax.tree.map(average, *params), jax.tree.map(average, *states)), shardings)

  def scores(members, splits=SPLITS):
    params, model_state = mean_of(members)
    return {s: evaluate(single, par, eval_step, params, model_state, s) for s in splits}

  metric, sign = exp.best_metric, (-1 if exp.lower_is_better else 1)
  rows = []
  for r in range(n):
    rows.append({"soup": f"replica {r}", "members": [r], **_flat(scores([r]))})
  order = sorted(range(n), key=lambda r: -sign * rows[r][f"validation/{metric}"])
  greedy, best = [order[0]], rows[order[0]][f"validation/{metric}"]
  for r in order[1:]:
    value = scores(greedy + [r], ("validation",))["validation"][metric]
    if sign * value >= sign * best:
      greedy, best = greedy + [r], value
  rows.append({"soup": "uniform", "members": list(range(n)), **_flat(scores(list(range(n))))})
  rows.append({"soup": "greedy", "members": sorted(greedy), **_flat(scores(greedy))})
  for row in rows:
    log(f"{row['soup']:>10} (replicas {', '.join(map(str, row['members']))}): validation {metric} "
        f"{row[f'validation/{metric}']:.4f}  test {metric} {row[f'test/{metric}']:.4f}")
  _write_jsonl(Path(cfg.run_dir) / "soup.jsonl", rows)
  if out_dir is not None:
    params, model_state = jax.device_get(mean_of(greedy))
    if rules.lora_enabled(cfg.lora):
      with hparams.scope(model_state):  # the soup's LoRA scale, where train.sweep varies it
        params = lora.merge(params, cfg.lora)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_model(single, params, out_dir, model_state)
    log(f"wrote the greedy soup (replicas {', '.join(map(str, sorted(greedy)))}) to {out_dir}")
  return rows


def _flat(by_split: dict) -> dict:
  return {f"{s}/{k}": v for s, m in by_split.items() for k, v in m.items()}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
  if jax.process_index() == 0:
    path.write_text("".join(json.dumps(r, default=float) + "\n" for r in rows))
