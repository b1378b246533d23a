"""jaxft bench reports sane numbers, its FLOP estimate agrees with XLA's, and a training run compiles
its step once per batch shape."""
import json
import math
from pathlib import Path

import pytest
from conftest import optimised_env

from jaxft import bench
from jaxft.cli import main
from jaxft.config import dump
from jaxft.train import train


def test_bench_json_has_positive_finite_numbers(tiny_cfg, tmp_path, capsys):
  (tmp_path / "cfg.yaml").write_text(dump(tiny_cfg()))
  assert main(["bench", str(tmp_path / "cfg.yaml"), "--steps", "5", "--warmup", "1", "--json"]) == 0
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(r) == {f.name for f in bench.dataclasses.fields(bench.Result)}
  for key in ("compile_s", "step_ms_median", "step_ms_p10", "step_ms_p90", "host_ms_median", "examples_per_s",
              "tokens_per_s", "xla_flops_per_step", "analytic_flops_per_step", "achieved_flops_per_s",
              "peak_flops_per_s", "mfu"):
    assert math.isfinite(r[key]) and r[key] > 0, key
  assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
  assert r["length"] == 32 and r["batch_size"] == 16 and r["peak_source"].startswith("jnp.dot")
  assert 0 < r["mfu"] < 1


def test_analytic_flops_agree_with_xla(tiny_cfg):
  r = bench.bench(tiny_cfg(), steps=2, warmup=1, length=32)
  assert 0.5 < r.analytic_flops_per_step / r.xla_flops_per_step < 2, (r.analytic_flops_per_step,
                                                                       r.xla_flops_per_step)


def test_analytic_flops_skip_frozen_weight_gradients(tiny_cfg):
  """Frozen encoder blocks do no weight gradients: the analytic count drops by 2 FLOPs per frozen matmul
  param per token, as XLA's does (6N -> 4N + 2N_trained)."""
  full = bench.bench(tiny_cfg(), steps=2, warmup=1, length=32)
  frozen = bench.bench(tiny_cfg("freeze_bottom_layers=2"), steps=2, warmup=1, length=32)
  assert frozen.analytic_flops_per_step < 0.95 * full.analytic_flops_per_step
  analytic, xla = (frozen.analytic_flops_per_step / full.analytic_flops_per_step,
                   frozen.xla_flops_per_step / full.xla_flops_per_step)
  assert abs(analytic - xla) < 0.1, (analytic, xla)


def test_bench_times_seed_vectorised_steps(tiny_cfg):
  """train.seeds=2: one step trains both replicas; examples and FLOPs count every replica's."""
  one = bench.bench(tiny_cfg(), steps=2, warmup=1, length=32)
  two = bench.bench(tiny_cfg("train.seeds=2", "train.replica_chunk=2"), steps=2, warmup=1, length=32)  # vmapped
  assert two.params == one.params and two.analytic_flops_per_step == 2 * one.analytic_flops_per_step
  assert two.examples_per_s == pytest.approx(2 * 16 / (two.step_ms_median / 1000))
  assert 1.5 < two.xla_flops_per_step / one.xla_flops_per_step < 2.5  # (a lax.map loop would count once)


def test_training_compiles_once_per_bucket(tiny_cfg):
  cfg = tiny_cfg("train.epochs=2", "train.log_every=1", "data.buckets=[8,16,32]")
  train(cfg)
  rows = [json.loads(line) for line in open(Path(cfg.run_dir) / "metrics.jsonl")]
  compiles = [r["compiles"] for r in rows if r["split"] == "train"]
  from jaxft.data import batching
  from jaxft.experiment import build
  exp = build(cfg, print)
  src = batching.bucketed(exp.splits["train"], exp.task.collate, 16, exp.total_steps, cfg.seed, [8, 16, 32])
  buckets = {src[i]["input_ids"].shape[1] for i in range(exp.total_steps)}
  assert len(buckets) >= 2 and compiles[-1] == len(buckets), (compiles, buckets)


def test_lm_bench_counts_loss_bearing_tokens(tiny_llama, sft_data, tmp_path):
  """SFT on real batches: only response tokens bear loss, so their MFU is a fraction of the plain one."""
  from conftest import lm_overrides

  from jaxft.config import load_config
  cfg = load_config(None, lm_overrides(tiny_llama["tied"], sft_data, tmp_path / "run"))
  r = bench.bench(cfg, steps=3, warmup=1, length=64, data="real")
  assert r.tokens_per_s > 0 and 0 < r.trained_tokens_per_step < 0.5 * r.batch_size * r.length
  assert 0 < r.mfu_trained < 0.5 * r.mfu
  assert 0.5 < r.analytic_flops_per_step / r.xla_flops_per_step < 2  # the tied output layer counted


@pytest.mark.slow
@pytest.mark.registry
def test_gpu_check_dry_run_prints_the_table():
  """benchmarks/gpu_check.sh (GPU figures need a GPU): its commands and table, at toy sizes on CPU."""
  import subprocess
  root = Path(__file__).resolve().parents[1]
  r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=root, capture_output=True, text=True,
                     timeout=1800, env=optimised_env())
  assert r.returncode == 0, r.stderr[-3000:]
  for run in ("bert_base", "smollm2_sft", "efficientnet_lite0", "minilm_1_seed", "minilm_n_seeds"):
    assert f"\n{run} " in r.stdout, r.stdout
  assert "2 seeds in one step:" in r.stdout and "jaxft gpu_check on 1 x cpu (float32" in r.stdout
