"""`jaxft export`: the run's best checkpoint as a plain model directory, LoRA adapters merged in.

The output is the backbone in its family's format (for Hugging Face families: config.json,
model.safetensors in PyTorch names, which transformers loads, the tokenizer) plus the task's head (`<head key>.msgpack`), so `model.name=DIR` loads it back.
"""
from pathlib import Path

import jax

from jaxft import hparams, lora, quantize, rules, runs
from jaxft.errors import JaxftError
from jaxft.experiment import save_model


def export(cfg, out_dir, step: int | None = None, log=print, replica: int | None = None) -> Path:
  """replica: of a seed-vectorised run (train.seeds), which replica to write (its best checkpoint by default)."""
  out = Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise JaxftError(f"export directory {out} exists and is not empty; choose a new one")
  exp, _, _, state = runs.open_state(cfg, step, "exporting", log, required=True, one_model=True, replica=replica)
  params, model_state = jax.device_get((state.params, state.model_state))
  if cfg.model.quantize:  # the base back in float32, for the adapters to merge into
    params = quantize.dequantized(params, cfg.model.quantize)
  if rules.lora_enabled(cfg.lora):
    with hparams.scope(model_state):  # the replica's LoRA scale, where train.sweep varies it
      params = lora.merge(params, cfg.lora)
  out.mkdir(parents=True, exist_ok=True)
  save_model(exp, params, out, model_state)
  log(f"exported to {out}" + (" (LoRA adapters merged)" if rules.lora_enabled(cfg.lora) else ""))
  return out
