"""A run directory, RUN_DIR: its lock, its checkpoints (RUN_DIR/checkpoints) and the run record in each, the
choice of the best step and of a replica, and restore onto the run's mesh. Every command that reads or writes
a run opens it here: `jaxft train` (`for_training`, `resume`, `restore_best`); eval, generate, export, soup and
interpolate (`open_state`, `record`).
"""
import contextlib
import shutil
import tempfile
from pathlib import Path

import jax

from jaxft import config as config_lib
from jaxft import config_yaml, run_lock, runtime
from jaxft.checkpoint import Checkpointer, RestoreError, RunRecord
from jaxft.errors import JaxftError
from jaxft.experiment import build, setup

_CLOSE_TIMEOUT_S = 60  # after an error: how long a save in flight may delay the exit


def checkpointer(cfg, reading: bool = False) -> Checkpointer:
  return Checkpointer(Path(cfg.run_dir) / "checkpoints", cfg.train.keep, reading)


@contextlib.contextmanager
def for_training(cfg, log):
  """Creates and locks RUN_DIR for the block and yields its Checkpointer (--no-resume: the old checkpoints
  removed first). On an error the Checkpointer is closed without waiting long on a save in flight."""
  run_dir, is_main = Path(cfg.run_dir), jax.process_index() == 0
  ckpt_dir = run_dir / "checkpoints"
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise JaxftError(f"cannot create run_dir {run_dir}: {e.strerror}") from None
  with run_lock.held(run_dir, enabled=is_main):
    if not cfg.resume and ckpt_dir.exists():
      log(f"--no-resume: removing the previous checkpoints in {ckpt_dir}")
      if is_main:
        shutil.rmtree(ckpt_dir)
    if is_main:
      _check_writable(ckpt_dir)
    runtime.log_orbax_to(run_dir / ("orbax.log" if is_main else f"orbax.process_{jax.process_index()}.log"))
    ckpt = checkpointer(cfg)
    try:
      yield ckpt
    except BaseException:  # exit promptly: never wait long on a save in flight after an error
      ckpt.close(timeout=_CLOSE_TIMEOUT_S)
      raise


def check_dir(cfg) -> None:
  """A run_dir that names a file fails before anything is built."""
  run_dir = Path(cfg.run_dir)
  if run_dir.exists() and not run_dir.is_dir():
    raise JaxftError(f"run_dir {run_dir} exists and is not a directory")


# Keys a resumed run may change: where and how it runs and logs, not what it computes.
RESUMABLE_CHANGES = ("run_dir", "resume", "parallel.", "train.log_every", "train.checkpoint_every", "train.keep",
                     "train.eval_batch_size", "train.on_nonfinite", "data.workers", "data.tfds_dir",
                     "task.label_names")  # (the labels' order: the run's is kept, jaxft/labels.py)


# Keys added since runs began to be resumed, as the runs before them behaved (not their new defaults).
BEHAVED_BEFORE = {"task.flip": True}  # image_classification flipped every training image before the key existed


def resumed_labels(cfg) -> tuple | None:
  """Before `build`, for a run that resumes its checkpoints: their labels (labels()); and a saved config that
  differs in what it computes is an error naming the keys (check_same_run). None: nothing to resume."""
  if not cfg.resume:
    return None
  with checkpoints(cfg, required=False) as ckpt:
    if ckpt is None:
      return None
    check_same_run(cfg)
    return labels(ckpt, cfg.run_dir)


def check_same_run(cfg) -> None:
  """Resuming a run whose config (RUN_DIR/config.yaml) differs in what it computes is an error naming the keys:
  the checkpoints would continue, or (a finished run) report, another experiment than the one asked for."""
  saved_path = Path(cfg.run_dir) / "config.yaml"
  if not saved_path.is_file():
    return
  saved, now = _flat(config_yaml.load(saved_path.read_text(), str(saved_path)) or {}), _flat(config_lib.to_dict(cfg))
  # a key the saved config lacks (added since) counts as its default; one it has that no longer exists, not at all
  default = _flat(config_lib.to_dict(config_lib.load_config(None, (f"task.name={cfg.task.name}",))))
  default.update({k: v for k, v in BEHAVED_BEFORE.items() if k in default})
  changed = [k for k in sorted(now) if saved.get(k, default.get(k)) != now[k]
             and not any(k == c or k.startswith(c) for c in RESUMABLE_CHANGES)]
  if changed:
    diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
    more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    raise JaxftError(f"run_dir {cfg.run_dir} holds a run with another config ({diff}{more}); resuming would mix two "
                     f"experiments: give this one its own run_dir=..., or pass --no-resume to discard that run")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _check_writable(ckpt_dir: Path) -> None:
  """A checkpoint dir that cannot be written fails the run now, not at its first save."""
  try:
    ckpt_dir.mkdir(exist_ok=True)
    tempfile.TemporaryFile(dir=ckpt_dir).close()
  except OSError as e:
    raise JaxftError(f"cannot write checkpoints to {ckpt_dir}: {e.strerror}") from None


def restore(ckpt, par, targets, step):
  """(state on the devices, data position, run record) of checkpoint `step`, in its phase's layout."""
  k = ckpt.record(step).phase
  state, data_state, record = ckpt.restore(step, targets[k])
  return par.restored(state, targets[k]), data_state, record


def labels(ckpt, run_dir) -> tuple | None:
  """(labels, where) stored with the newest checkpoint of `ckpt` whose record reads, for `build`; None when
  there is none."""
  for step in sorted(ckpt.steps() if ckpt else (), reverse=True):
    try:
      return ckpt.record(step).labels, f"the run in {run_dir} (checkpoint {step})"
    except RestoreError:
      continue  # damaged: resume moves it aside
  return None


def resume(exp, par, targets, ckpt, log, warn):
  """(state, data position, run record, step) of the newest checkpoint that restores (damaged newer ones
  are moved aside), or of a fresh start. The best checkpoint is checked now, not when the test needs it."""
  latest, restored = ckpt.restore_newest(lambda step: restore(ckpt, par, targets, step), warn)
  if latest is None:
    return par.put_state(exp.initial_state(), targets[0]), None, RunRecord(labels=exp.task.label_names), None
  state, data_state, record = restored
  record.labels = exp.task.label_names  # build took the checkpoints' order (a record from before: stored now)
  for best in sorted(record.kept() - {latest}):
    try:
      restore(ckpt, par, targets, best)  # read to check it, and dropped
    except RestoreError as e:
      warn(f"the best checkpoint so far, {e.step}, cannot be restored ({e.reason}); moved it to "
           f"{ckpt.move_aside(e.step)}; the best is chosen among the evaluations from here on")
      record.forget(best)
  best = (f"best so far: step {record.best_step}, validation {exp.best_metric} {record.best_value:.4f}"
          if record.best_step is not None else "no best checkpoint yet")
  log(f"resuming from {ckpt.directory}/{latest} in phase {exp.phases[record.phase].name} ({best})")
  return state, data_state, record, latest


def restore_best(exp, ckpt, par, targets, record, state, step: int, warn):
  """`state` (of checkpoint `step`) with the params and model state of the best checkpoint: in a seed-
  vectorised run, each replica's own. A best checkpoint that cannot be restored is moved aside with a
  warning; its replicas keep `state`'s params (the record then names `step` for them, or forgets the
  mean's best)."""
  wanted = set(record.best_steps or ()) | {record.best_step}
  states = {step: state}
  for s in sorted(wanted - {None, step}):
    try:
      states[s] = restore(ckpt, par, targets, s)[0]
    except RestoreError as e:
      warn(f"the best checkpoint {e.step} cannot be restored ({e.reason}); moved it to {ckpt.move_aside(e.step)}; "
           f"testing the final params (step {step}) instead")
      record.forget(s)
  best = exp.replicas.at_best(record, states, step)
  if best is None:
    return states.get(record.best_step, state)
  params, model_state = best
  shardings = jax.tree.map(lambda x: x.sharding, targets[record.phase])
  return state.replace(params=jax.device_put(params, shardings.params),
                       model_state=jax.device_put(model_state, shardings.model_state))


@contextlib.contextmanager
def checkpoints(cfg, required: bool = True):
  """The run's Checkpointer for reading, closed after the block; None when the run has no checkpoints and not
  `required` (else an error saying to train first). Nothing is created."""
  ckpt_dir = Path(cfg.run_dir) / "checkpoints"
  ckpt = checkpointer(cfg, reading=True) if ckpt_dir.is_dir() else None  # (no run lock held: touch no file)
  if ckpt is not None and ckpt.latest_step() is None:
    ckpt.close()
    ckpt = None
  if ckpt is None and required:
    missing = f"run_dir {cfg.run_dir} does not exist" if not Path(cfg.run_dir).exists() else f"no checkpoints in {ckpt_dir}"
    raise JaxftError(f"{missing}: train first (same config and run_dir)")
  try:
    yield ckpt
  finally:
    if ckpt is not None:
      ckpt.close()


def record(cfg) -> RunRecord:
  """The run record of the run's newest checkpoint (its best steps, phase, probe); an error if it has none."""
  with checkpoints(cfg) as ckpt:
    return ckpt.record(ckpt.latest_step())


def open_state(cfg, step: int | None = None, using: str = "evaluating", log=print, *, required: bool = False,
               one_model: bool = False, replica: int | None = None, data: bool = True):
  """(experiment, Parallel, restore targets, state on the devices) of checkpoint `step` of the run (default: its
  best; in a seed-vectorised run each replica's own), or, when the run has no checkpoints and not `required`, of
  the model as loaded. one_model: a command that uses one model (export, generate) takes `replica` (--replica)
  alone, which a seed-vectorised run must name. `using` names the use in the log. data=False: no split is read."""
  with checkpoints(cfg, required) as ckpt:
    exp = build(cfg, log, run_labels=labels(ckpt, cfg.run_dir), data=data)
    r = exp.replicas.chosen(replica, cfg.run_dir) if one_model else None
    par, targets = setup(exp, log)
    if ckpt is None:
      if step is not None:
        raise JaxftError(f"--step {step}: no checkpoints in {Path(cfg.run_dir) / 'checkpoints'}")
      untrained = " (a new head is untrained)" if exp.task.head_key is not None else ""
      log(f"no checkpoints in {Path(cfg.run_dir) / 'checkpoints'}: {using} the model as loaded{untrained}")
      return exp, par, targets, exp.replicas.one(par.put_state(exp.initial_state(), targets[0]), r)
    latest = ckpt.latest_step()
    if step is not None and step not in ckpt.steps():
      raise JaxftError(f"--step {step}: no such checkpoint in {ckpt.directory} "
                       f"(steps: {', '.join(map(str, ckpt.steps()))})")
    which = "" if r is None else f" (replica {r})"
    if step is None and exp.replicas:  # each replica at its own best
      state, record = restore(ckpt, par, targets, latest)[::2]
      state = restore_best(exp, ckpt, par, targets, record, state, latest, log)
      log(f"{using} each replica's best checkpoint in {ckpt.directory} (steps "
          f"{', '.join(map(str, record.best_steps))}){which}")
    else:
      step = step if step is not None else (ckpt.record(latest).best_step or latest)
      state = restore(ckpt, par, targets, step)[0]
      log(f"{using} checkpoint {ckpt.directory}/{step}{which}")
    return exp, par, targets, exp.replicas.one(state, r)
