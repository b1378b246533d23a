"""`jaxft export`: the run's best checkpoint as a plain model directory, LoRA adapters merged in.

The output is a Hugging Face checkpoint dir (config.json, flax_model.msgpack, tokenizer), plus
classifier.msgpack and 1_Pooling/ for a mean-pooled head, so `model.name=DIR` loads it back.
"""
from pathlib import Path

import jax

from jaxft import lora, parallel
from jaxft.checkpoint import Checkpointer
from jaxft.errors import JaxftError
from jaxft.train import build


def export(cfg, out_dir, step: int | None = None, log=print) -> Path:
  out = Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise JaxftError(f"export directory {out} exists and is not empty; choose a new one")
  ckpt_dir = Path(cfg.run_dir) / "checkpoints"
  ckpt = Checkpointer(ckpt_dir, cfg.train.keep)
  if (latest := ckpt.latest_step()) is None:
    raise JaxftError(f"no checkpoints in {ckpt_dir}: train first (same config and run_dir)")
  step = step if step is not None else (ckpt.meta(latest)["best_step"] or latest)
  exp = build(cfg, log)
  par = parallel.Parallel(cfg, parallel.make_mesh(cfg.parallel.mesh))
  state, _, _ = ckpt.restore(step, par.abstract_state(exp.state))
  ckpt.close()
  params = jax.device_get(state.params)
  if cfg.lora.targets:
    params = lora.merge(params, cfg.lora)
  out.mkdir(parents=True, exist_ok=True)
  exp.model.save(params, out)
  log(f"exported step {step} of {ckpt_dir} to {out}" + (" (LoRA adapters merged)" if cfg.lora.targets else ""))
  return out
