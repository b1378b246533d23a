"""orbax checkpoints of (train state, data-iterator position, run record): async, last K + best."""
import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jaxft.errors import JaxftError


@dataclasses.dataclass
class RunRecord:
  """The loop's bookkeeping, checkpointed with the state: where the run is and what it found best."""
  phase: int = 0  # index into the run's phases
  phase_start: int = 0  # the step the phase began after
  best_step: int | None = None  # the checkpoint with the best validation train.best_metric
  best_value: float | None = None
  plateau_best: float | None = None  # the phase's `until` metric: best so far, and evals since then
  plateau_bad: int = 0

  @classmethod
  def from_json(cls, d: dict) -> "RunRecord":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass
class _KeepSteps(cm.PreservationPolicy):
  """Preserves the steps in `steps` (the loop's best step), whatever else is deleted."""
  steps: set

  def should_preserve(self, checkpoints, *, context):
    return [c.step in self.steps for c in checkpoints]


class Checkpointer:
  """Keeps the last `keep` checkpoints plus `best_step`, which the training loop sets."""

  def __init__(self, directory, keep: int):
    self.directory = Path(directory).absolute()
    self._best = _KeepSteps(set())
    policy = cm.AnyPreservationPolicy([cm.LatestN(n=keep), self._best])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, record: RunRecord):
    """Saves asynchronously; `record.best_step` is preserved from now on."""
    self._best.steps = {record.best_step}
    if step in self.steps():
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(dataclasses.asdict(record)))
    self.manager.save(step, args=args)

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
    except Exception as e:  # any failure must stop the run, never fall back to step 0
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise JaxftError(f"checkpoint {self.directory}/{step} exists but cannot be restored "
                       f"({type(e).__name__}: {first[:300]}); fix the config to match it, or start over "
                       f"with --no-resume or a new run_dir") from None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
