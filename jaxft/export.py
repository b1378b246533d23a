"""`jaxft export`: the run's best checkpoint as a plain model directory, LoRA adapters merged in.

The output is the backbone in its family's format (for Hugging Face families: config.json,
flax_model.msgpack, tokenizer) plus the task's head (`<head key>.msgpack`), so `model.name=DIR` loads it back.
"""
from pathlib import Path

import jax

from jaxft import lora, replicas, rules
from jaxft.checkpoint import Checkpointer
from jaxft.errors import JaxftError
from jaxft.experiment import build, save_model, setup


def export(cfg, out_dir, step: int | None = None, log=print, replica: int | None = None) -> Path:
  """replica: of a seed-vectorised run (train.seeds), which replica to write (its best checkpoint by default)."""
  out = Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise JaxftError(f"export directory {out} exists and is not empty; choose a new one")
  ckpt_dir = Path(cfg.run_dir) / "checkpoints"
  ckpt = Checkpointer(ckpt_dir, cfg.train.keep)
  if (latest := ckpt.latest_step()) is None:
    raise JaxftError(f"no checkpoints in {ckpt_dir}: train first (same config and run_dir)")
  exp = build(cfg, log)
  r = replicas.chosen(exp, replica)
  record = ckpt.record(latest)
  if step is None:  # the best: a replica's own, or the run's
    step = record.best_steps[r] if exp.seeds and record.best_steps else (record.best_step or latest)
  _, targets = setup(exp, log)
  state, _, _ = ckpt.restore(step, targets[ckpt.record(step).phase])
  ckpt.close()
  params, model_state = state.params, state.model_state
  if exp.seeds:
    params, model_state = replicas.take(params, r, exp.own), replicas.take(model_state, r)
  params = jax.device_get(params)
  if rules.lora_enabled(cfg.lora):
    params = lora.merge(params, cfg.lora)
  out.mkdir(parents=True, exist_ok=True)
  save_model(exp, params, out, jax.device_get(model_state))
  log(f"exported step {step}{f' of replica {r}' if exp.seeds else ''} of {ckpt_dir} to {out}" + (" (LoRA adapters merged)" if rules.lora_enabled(cfg.lora) else ""))
  return out
