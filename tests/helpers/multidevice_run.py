"""Subprocess driver: train the tiny model under several parallel configs; print losses as JSON.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/helpers/multidevice_run.py DIR NAME=OVERRIDES...

DIR holds tiny_bert/ and tiny_data/ (written by the test); each NAME=a,b,c runs `train` with those
overrides and reports the per-step train losses from its metrics.jsonl, and as NAME/test its test metrics.
"""
import faulthandler
import json
import os
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: conftest
from conftest import tiny_overrides  # noqa: E402

from jaxft import parallel  # noqa: E402
from jaxft.config import load_config  # noqa: E402
from jaxft.train import train  # noqa: E402


def split_overrides(text: str) -> tuple:
  """'a=1,b=[x, y],c={k: v}' -> ('a=1', 'b=[x, y]', 'c={k: v}'): commas inside brackets stay."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += (ch in "[{") - (ch in "]}")
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  return tuple(o for o in out + [cur] if o)


def main():
  if "JAXFT_TEST_DUMP_AFTER" in os.environ:  # where every thread is, should the run hang (the test kills it later)
    faulthandler.dump_traceback_later(float(os.environ["JAXFT_TEST_DUMP_AFTER"]), exit=False)
  root = Path(sys.argv[1])
  tiny_bert = {"pt": root / "tiny_bert" / "pt"}
  out = {}
  for arg in sys.argv[2:]:
    name, overrides = arg.split("=", 1)
    run_dir = root / "runs" / name
    cfg = load_config(None, tiny_overrides(tiny_bert, root / "tiny_data", run_dir, "pt", *split_overrides(overrides)))
    if cfg.parallel.coordinator:  # one of several local processes (jax.distributed on 127.0.0.1)
      jax.config.update("jax_num_cpu_devices", int(os.environ["JAXFT_TEST_CPU_DEVICES"]))
      parallel.initialize(cfg.parallel)
    train(cfg)
    print(f"run {name} done", flush=True)
    if jax.process_index() != 0:
      continue
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    out[name] = [r["loss"] for r in rows if r["split"] == "train"]
    out[name + "/test"] = next(r for r in rows if r["split"] == "test")
  if jax.process_index() == 0:
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
