"""orbax checkpoints of (train state, data-iterator position, run record): async, last K + best.

A checkpoint that cannot be restored while an older one can is damaged: it is moved to RUN_DIR/damaged/,
never deleted. A save that fails (full disk, no permission) is a JaxftError; earlier checkpoints stay.
"""
import contextlib
import dataclasses
import functools
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from jaxft import faults
from jaxft.errors import JaxftError


class RestoreError(JaxftError):
  """Checkpoint `step` exists but cannot be restored."""

  def __init__(self, directory: Path, step: int, reason: str):
    self.step, self.reason = step, reason
    super().__init__(f"checkpoint {directory}/{step} cannot be restored ({reason})")


def _reason(e: Exception) -> str:
  """The OS error behind an exception if it names one, else its first line (without TensorStore's spec)."""
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror} (errno {e.errno})"
  if code := re.search(r"\[os_error_code='(\d+)'\]", str(e)):
    return f"{os.strerror(int(code[1]))} (errno {code[1]})"
  first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


@dataclasses.dataclass
class RunRecord:
  """The loop's bookkeeping, checkpointed with the state: where the run is and what it found best."""
  phase: int = 0  # index into the run's phases
  phase_start: int = 0  # the step the phase began after
  best_step: int | None = None  # the checkpoint with the best validation train.best_metric
  best_value: float | None = None
  plateau_best: float | None = None  # the phase's `until` metric: best so far, and evals since then
  plateau_bad: int = 0
  best_steps: list | None = None  # train.seeds: each replica's best step and value (best_step: the mean's)
  best_values: list | None = None
  pruned: list | None = None  # train.sweep_prune: per replica, the step its setting was dropped at (None: training)
  batch_units: int = 1  # train.batch_schedule: the batch now, in units of train.batch_size, and since which step
  batch_changed: int = 0
  probe_step: int | None = None  # where a head-only first phase (a linear probe) ended: WiSE-FT's start
  labels: list | None = None  # what the head's outputs stand for, in order (jaxft/labels.py; None: no head)

  def kept(self) -> set:
    """The best steps and the probe's end, which checkpoint deletion preserves."""
    return ({self.best_step, self.probe_step} | set(self.best_steps or ())) - {None}

  def forget(self, step: int) -> None:
    """Drops `step` (a damaged checkpoint) from the bests; evaluations from here on choose anew."""
    if self.best_step == step:
      self.best_step = self.best_value = None
    for r, s in enumerate(self.best_steps or ()):
      if s == step:
        self.best_steps[r] = self.best_values[r] = None

  @classmethod
  def from_json(cls, d: dict) -> "RunRecord":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass
class _KeepSteps(cm.PreservationPolicy):
  """Preserves the steps in `steps` (the loop's best step), whatever else is deleted."""
  steps: set

  def should_preserve(self, checkpoints, *, context):
    return [c.step in self.steps for c in checkpoints]


@functools.cache
def _array_handler() -> None:
  """Once per process (after jax.distributed starts): a one-process run saves each array from one replica.
  Replica-parallel saving splits a replicated array's write among the processes holding its replicas; within
  one process it only slices every array per local device first, each slice a compiled program (half the time
  of a tiny 8-device run's first save)."""
  if jax.process_count() == 1:
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # not its warning that the registration overrides the default handler
    try:
      ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                              override=True)
    finally:
      absl_logger.setLevel(level)


class Checkpointer:
  """Keeps the last `keep` checkpoints plus the best ones (RunRecord.kept), which the training loop sets."""

  def __init__(self, directory, keep: int, reading: bool = False):
    """reading: for a command that only reads (or one not yet holding the run's lock): the saves cut short that
    a training run cleans up on its start are left alone, since another run may be writing one now."""
    _array_handler()
    self.directory = Path(directory).absolute()
    self._best = _KeepSteps(set())
    policy = cm.AnyPreservationPolicy([cm.LatestN(n=keep), self._best])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=not reading)  # saves cut short by a kill
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending = None  # the step whose async save may still be in flight

  def latest_step(self):
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, record: RunRecord):
    """Saves asynchronously; the record's best steps are preserved from now on."""
    self._best.steps = record.kept()
    if step in self.steps():
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(dataclasses.asdict(record)))
    # manager.save also raises the failure of the save before it, still pending
    self._checked(step if self._pending is None else self._pending, self.manager.save, step, args=args)
    self._pending = step
    faults.inject("save", step)

  def _checked(self, step, fn, *args, **kw):
    """fn(*args, **kw); a failure is the save of `step` failing."""
    try:
      return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 (orbax raises anything from its writer threads)
      self._pending = None
      logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # the abandoned writes' 'never retrieved'
      # On disk: orbax's own list already lacks the steps it was to delete once this save committed.
      kept = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
      raise JaxftError(f"cannot write checkpoint {self.directory}/{step} ({_reason(e)}); the earlier checkpoints "
                       f"are intact (steps: {', '.join(map(str, kept)) or 'none'}); free disk space or fix the "
                       f"directory's permissions, then run the same command to resume") from None

  def record(self, step: int) -> RunRecord:
    """The run record of checkpoint `step` alone (best step, phase), without reading any arrays."""
    return RunRecord.from_json(self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore(self, step: int, target):
    """(state, data_state, record) of checkpoint `step`, restored onto the shapes, dtypes and
    shardings of `target` (arrays or jax.ShapeDtypeStructs): any mesh, any device count."""
    target = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                          ocp.utils.to_shape_dtype_struct(x), target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    out = self._restore(step, args)
    return out["state"], out["data"], RunRecord.from_json(out["meta"])

  def _restore(self, step, args):
    try:
      return self.manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 (any failure must stop the run, never fall back to step 0)
      raise RestoreError(self.directory, step, _reason(e)) from None

  def restore_newest(self, restore, warn):
    """(step, restore(step)) for the newest checkpoint that restores, or (None, None) if there is none.
    Newer ones that fail while an older one restores are damaged: moved aside, with a warning. If none
    restores, the config rather than the files is the likely culprit: an error, and nothing is moved."""
    failed = []
    for step in sorted(self.steps(), reverse=True):
      try:
        out = restore(step)
      except RestoreError as e:
        failed.append(e)
        continue
      for e in failed:
        warn(f"checkpoint {e.step} is damaged ({e.reason}); moved it to {self.move_aside(e.step)} and "
             f"resumed from checkpoint {step}")
      return step, out
    if failed:
      raise JaxftError(f"none of the {len(failed)} checkpoints in {self.directory} can be restored (newest, "
                       f"{failed[0].step}: {failed[0].reason}); if the config changed since they were written, "
                       f"change it back, or train in a new run_dir (--no-resume would delete them)")
    return None, None

  def move_aside(self, step: int) -> Path:
    """Moves checkpoint `step` to RUN_DIR/damaged/STEP (process 0; every process then rescans)."""
    dest = self.directory.parent / "damaged" / str(step)
    if jax.process_index() == 0 and (self.directory / str(step)).exists():
      dest = next(d for i in range(1000) if not (d := dest.with_name(f"{step}" + (f".{i}" if i else ""))).exists())
      dest.parent.mkdir(exist_ok=True)
      shutil.move(self.directory / str(step), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxft_move_aside_{step}")
    self.manager.reload()
    return dest

  def wait(self):
    self._checked(self._pending, self.manager.wait_until_finished)
    self._pending = None

  def close(self, timeout: float | None = None):
    """Waits for the save in flight (at most `timeout` s: after an error, exiting beats a hang; an
    uncommitted save is discarded on the next start) and closes."""
    if timeout is None:
      self.wait()
      self.manager.close()
      return
    def close():
      with contextlib.suppress(Exception):  # the error being reported is the one that matters
        self.manager.close()
    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(timeout)
