"""jaxft plan: the run's programs compiled for TPU topologies with libtpu's compile-only devices (no TPU here),
memory per chip against the chip's HBM, the compiler's step estimate, collectives; a config that does not
fit is one line and exit 2; libtpu installed leaves every other verb as quiet as before."""
import importlib.util
import json

import pytest
from conftest import jaxft, lm_overrides, tiny_overrides

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="jaxft plan compiles with libtpu: pip install 'jaxft[tpu]' (the test extra has it)")

HLO = """HloModule jit_step, entry_computation_layout={...}

%fused_computation.1 (param_0: f32[8,4]) -> f32[2,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %all-reduce.9 = f32[8,4]{1,0} all-reduce(%param_0), channel_id=5, to_apply=%add
  ROOT %dynamic-slice.1 = f32[2,4]{1,0} dynamic-slice(%all-reduce.9, %c, %c), dynamic_slice_sizes={2,4}
}

%body.2 (p: (s32[], bf16[16,4])) -> (s32[], bf16[16,4]) {
  %ag = bf16[16,4]{1,0:T(8,128)(2,1)} all-gather(%x), channel_id=1, dimensions={0}
  %cps = (bf16[4,4]{1,0}, bf16[4,4]{1,0}, u32[]{:S(2)}) collective-permute-start(%y), channel_id=2
  ROOT %t = (s32[], bf16[16,4]) tuple(%i, %ag)
}

ENTRY %main.3 (a: f32[8,4]) -> f32[2,4] {
  %w = (s32[], bf16[16,4]) while(%init), condition=%cond.2, body=%body.2, backend_config={"known_trip_count":{"n":"3"}}
  %fusion = f32[2,4]{1,0} fusion(%a), kind=kCustom, calls=%fused_computation.1
  ROOT %ar = (f32[2,4]{1,0}, f32[4]{0}) all-reduce(%fusion, %b), channel_id=6, to_apply=%add
}
"""


def test_collectives_counts_loops_and_fused_collectives():
  from jaxft.plan import collectives
  # the while body runs 3 times; the fusion wrapping an all-reduce (+ slice) counts once, as its kind; the
  # all-reduce inside the fused computation is not counted again; a tuple's arrays add up
  assert collectives(HLO) == {"all-gather": [3, 3 * 16 * 4 * 2], "all-reduce": [2, 2 * 4 * 4 + (8 + 4) * 4],
                              "collective-permute": [3, 3 * 4 * 4 * 2]}


def test_a_loop_without_a_known_trip_count_runs_to_its_conditions_bound():
  from jaxft.plan import collectives
  hlo = """HloModule jit_step

%cond.7 (p: (s32[])) -> pred[] {
  %constant.5 = s32[]{:T(128)} constant(5)
  %p = (s32[]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.9 = pred[]{:T(512)} compare(%i, %constant.5), direction=LT, metadata={op_name="while/cond/lt"}
}

%body.7 (p: (s32[])) -> (s32[]) {
  %ag = bf16[16,4]{1,0} all-gather(%x), channel_id=1, dimensions={0}, frontend_attributes={kernel_metadata={
"note":"an attribute over several lines"
}}, metadata={op_name="ag"}
  ROOT %t = (s32[]) tuple(%i)
}

ENTRY %main.3 (a: f32[8,4]) -> (s32[]) {
  ROOT %w = (s32[]) while(%init), condition=%cond.7, body=%body.7
}
"""
  assert collectives(hlo) == {"all-gather": [5, 5 * 16 * 4 * 2]}


def test_an_all_reduce_of_zero_padded_shards_is_an_all_gather():
  from jaxft.plan import collectives
  hlo = """HloModule jit_step

%fused_dus (p0: bf16[64,16], p1: bf16[1,16]) -> bf16[64,16] {
  %p0 = bf16[64,16]{1,0} parameter(0)
  %p1 = bf16[1,16]{1,0} parameter(1)
  ROOT %dynamic-update-slice.3 = bf16[64,16]{1,0} dynamic-update-slice(%p0, %p1, %i, %j)
}

ENTRY %main.3 (a: bf16[1,16]) -> bf16[64,16] {
  %zeros_dus_fusion = bf16[64,16]{1,0} fusion(%z, %a), kind=kLoop, calls=%fused_dus
  %copy-start.1 = (bf16[64,16]{1,0}, bf16[64,16]{1,0}, u32[]) copy-start(%zeros_dus_fusion)
  %copy-done.1 = bf16[64,16]{1,0} copy-done(%copy-start.1)
  %gathered = bf16[64,16]{1,0} all-reduce(%copy-done.1), channel_id=1, to_apply=%add
  ROOT %grad = bf16[64,16]{1,0} all-reduce(%g), channel_id=2, to_apply=%add
}
"""
  # libtpu's lowering of an FSDP weight gather: the shard written into zeros (through copies), then summed
  assert collectives(hlo) == {"all-gather (as all-reduce)": [1, 64 * 16 * 2], "all-reduce": [1, 64 * 16 * 2]}


def test_slices_have_the_torus_links_google_builds():
  from jaxft.plan import wraparound
  assert wraparound([4, 4, 4]) == wraparound([4, 8, 12]) == (True, True, True)  # v4 / v5p full cubes
  assert wraparound([2, 2, 1]) == wraparound([2, 4, 4]) == (False, False, False)
  assert wraparound([16, 16]) == (True, True, False) and wraparound([8, 16]) == (False, True, False)  # v5e / v6e
  assert wraparound([2, 2]) == (False, False, False)


@needs_libtpu
def test_fsdp_gathers_on_a_64_chip_torus_are_all_gathers():
  """Told of a v5p-128's wraparound links, libtpu gathers FSDP weights with all-gathers; without them it
  compiled all-reduces of zero-padded shards (twice the traffic) for the same program."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jaxft import plan
  devs = plan.devices("v5p:4x4x4")
  mesh = jax.make_mesh((64,), ("fsdp",), devices=devs, axis_types=(jax.sharding.AxisType.Auto,))
  w = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
  x = jax.ShapeDtypeStruct((64, 128, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
  loss = lambda w, x: jnp.sum((x @ w.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)  # noqa: E731
  grad = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, P("fsdp", None)))
  kinds = plan.collectives(grad.lower(w, x).compile().as_text())
  assert "all-gather" in kinds and "all-gather (as all-reduce)" not in kinds, kinds


def test_without_libtpu_plan_says_how_to_install_it(monkeypatch):
  import sys

  from jaxft import plan
  from jaxft.errors import JaxftError
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import fails as if it were not installed
  with pytest.raises(JaxftError, match=r"pip install 'jaxft\[tpu\]'"):
    plan.devices("v5e:2x2")


@needs_libtpu
def test_unknown_topology_is_one_line():
  from jaxft import plan
  from jaxft.errors import JaxftError
  with pytest.raises(JaxftError, match=r"--topology 'v5e:3x3': .*names look like"):
    plan.devices("v5e:3x3")


# backbone params of each configs/shapes model as published (the heads are the task's): a wrong or misspelt
# config field fails here, not in somebody's plan. EfficientNet-Lite0's 4.7M counts its ImageNet head (1.28M).
# ResNet-50's 25.6M counts its ImageNet head (2.05M).
SHAPES = {"bert-base-uncased": 109.5e6, "bert-large-uncased": 335e6, "vit-base-patch16-224": 85.8e6,
          "resnet-50": 25.557e6 - 2.049e6, "efficientnet-lite0-224": 4.65e6 - 1.281e6, "smollm2-135m": 134.5e6, "llama-3.2-1b": 1.236e9,
          "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.55e9}


def test_every_shapes_config_builds_the_published_model(tiny_bert):
  import math
  from pathlib import Path

  import jax

  from jaxft import config, models
  shapes = Path(__file__).parent.parent / "configs" / "shapes"
  assert sorted(d.name for d in shapes.iterdir() if d.is_dir()) == sorted(SHAPES)
  for name, published in SHAPES.items():
    cfg = config.load_config(None, (f"model.name={shapes / name}", "model.weights=shapes",
                                    f"model.tokenizer={tiny_bert['pt']}"))
    params = models.load(cfg.model, 0, log=lambda *a: None).params
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert abs(count / published - 1) < 0.01, (name, count, published)


def _plan(cfg, topology):
  from jaxft import plan
  return plan.plan(cfg, topology, log=lambda *a, **k: None)


@needs_libtpu
@pytest.mark.parametrize("topology,mesh,shards", [
    ("v5e:2x2", (), 1),  # data parallel: every chip holds all params
    ("v4:2x2x1", ("parallel.mesh.fsdp=-1", "parallel.mesh.data=1"), 4),  # FSDP over 4 v4 chips (megacore)
    ("v5e:2x2", ("parallel.mesh.data=2", "parallel.mesh.tensor=2"), 2),  # DP x TP
])
def test_plans_tiny_model_on_dp_fsdp_tp_meshes(tiny_cfg, topology, mesh, shards):
  import jax

  from jaxft import rules
  from jaxft.experiment import build
  cfg = tiny_cfg("data.pack=false", "data.buckets=[32]", *mesh)
  p = _plan(cfg, topology)
  assert p.chips == 4 and p.fits and p.peak_bytes < p.hbm_bytes
  names = [g.name for g in p.programs]
  assert names == ["train", "eval"], names  # one bucket: one train shape, one eval shape
  train, evaluate = p.programs
  assert train.shape == "16 x 32" and train.calls == 16 and evaluate.calls == 2
  cfg.model.weights = "shapes"
  n = rules.count(build(cfg, lambda *a, **k: None).initial_state().params)
  # per chip: all params (DP), a quarter (FSDP: dims that 4 does not divide stay whole), or between (TP)
  if shards == 1:
    assert train.params_bytes == 4 * n
  elif shards == 4:
    assert 4 * n / 4 <= train.params_bytes < 1.1 * 4 * n / 4
  else:
    assert 4 * n / 2 <= train.params_bytes < 4 * n
  assert 1.9 < train.opt_bytes / train.params_bytes < 2.2  # AdamW: two moments of every (trainable) param
  assert train.peak_bytes > train.params_bytes + train.opt_bytes  # + gradients, activations
  assert train.argument_bytes >= train.params_bytes + train.opt_bytes and train.alias_bytes > 0  # donated
  assert train.flops > 0 and train.estimate_s > 0 and train.estimate_source.startswith(("compiler", "roofline"))
  kinds = set(train.collectives)
  assert "all-reduce" in kinds  # gradients (DP), partial sums (TP)
  if shards == 4:
    assert {"all-gather", "all-gather (as all-reduce)"} & kinds  # FSDP gathers weights where they are used
  assert p.examples_per_s_per_chip == pytest.approx(16 / p.step_s / 4)
  assert 0 < p.mfu < 1
  del jax


@needs_libtpu
def test_does_not_fit_is_one_line_with_the_compilers_figures(tmp_path, tiny_llama, sft_data):
  # a 3.4B-param Llama (4 layers of Llama-70B's width) trained in full with AdamW, replicated on 16 GiB chips
  from transformers import LlamaConfig
  big = tmp_path / "big"
  LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=4, num_attention_heads=64,
              num_key_value_heads=8, vocab_size=448, max_position_embeddings=128).save_pretrained(big)
  r = jaxft("plan", *lm_overrides(big, sft_data, tmp_path / "run"), f"model.tokenizer={tiny_llama['tied']}",
            "--topology", "v5e:2x2")
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [line for line in r.stderr.splitlines() if "error:" in line]
  assert len(lines) == 1 and "does not fit a TPU v5e chip" in lines[0], r.stderr[-2000:]
  assert "parallel.mesh.fsdp=-1" in lines[0]  # what would make it fit
  assert not (tmp_path / "run").exists()  # a plan writes no run dir


@needs_libtpu
def test_causal_lm_plans_train_eval_and_generate_as_json(tmp_path, tiny_llama, sft_data):
  r = jaxft("plan", *lm_overrides(tiny_llama["tied"], sft_data, tmp_path / "run"), "lora.preset=qv",
            "train.micro_batch_size=8", "--topology", "v6e:2x2", "--json")
  assert r.returncode == 0, r.stderr[-2000:]
  p = json.loads(r.stdout)
  names = [g["name"] for g in p["programs"]]
  assert names[0] == "train" and "eval" in names and names[-1] == "generate", names
  assert p["chip"] == "TPU v6e" and p["fits"] and p["trained_tokens_per_s_per_chip"] > 0
  train = p["programs"][0]
  assert train["opt_bytes"] < train["params_bytes"] / 4  # LoRA: optimizer state for the adapters only
  assert "estimate" in p["step_source"] or p["step_source"] in ("compiler", "roofline")


def test_jaxft_verbs_stay_quiet_with_libtpu_installed(tmp_path, tiny_bert, tiny_data):
  """libtpu on a machine without a TPU: jax skips the TPU (no 'TPU accelerator type' / InitGoogle noise)."""
  r = jaxft("inspect", *tiny_overrides(tiny_bert, tiny_data, tmp_path / "run"))
  assert r.returncode == 0, r.stderr[-2000:]
  for noise in ("TPU", "InitGoogle", "libtpu"):
    assert noise not in r.stderr, r.stderr[:2000]


def test_shapes_weights_refuse_to_train(tmp_path, tiny_bert, tiny_data):
  r = jaxft("train", *tiny_overrides(tiny_bert, tiny_data, tmp_path / "run"), "model.weights=shapes")
  assert r.returncode == 2 and "model.weights=shapes" in r.stderr and "jaxft plan" in r.stderr


@needs_libtpu
def test_search_prints_the_fitting_settings_best_first(tmp_path, tiny_llama, sft_data):
  r = jaxft("plan", *lm_overrides(tiny_llama["tied"], sft_data, tmp_path / "run"), "--topology", "v5e:2x2",
            "--search", "--json")
  assert r.returncode == 0, r.stderr[-2000:]
  results = json.loads(r.stdout)
  meshes = {tuple(o[:3]) for o in (x["overrides"] for x in results)}
  assert ("parallel.mesh.data=4", "parallel.mesh.fsdp=1", "parallel.mesh.tensor=1") in meshes  # DP
  assert ("parallel.mesh.data=1", "parallel.mesh.fsdp=4", "parallel.mesh.tensor=1") in meshes  # FSDP
  fitting = [x["plan"] for x in results if "plan" in x]
  assert fitting and all(p["fits"] for p in fitting)
  speeds = [p["examples_per_s_per_chip"] for p in fitting]
  assert speeds == sorted(speeds, reverse=True)
  # a tiny model fits everywhere without recomputation: remat is never tried
  assert all("model.remat=none" in x["overrides"] for x in results)


@needs_libtpu
def test_scanned_blocks_cost_the_whole_step(tmp_path, sft_data):
  """model.scan_layers: the TPU cost model counts a scanned body once; plan extrapolates the whole step's
  flops from 1- and 2-block compiles, close to what the unrolled program counts."""
  from conftest import make_tiny_llama

  from jaxft.config import load_config
  model = make_tiny_llama(tmp_path / "deep", num_hidden_layers=6)
  base = lm_overrides(model, sft_data, tmp_path / "run") + ("train.micro_batch_size=null",)
  unrolled, scanned = (_plan(load_config(None, base + (f"model.scan_layers={s}",)), "v5e:2x2") for s in ("false", "true"))
  u, s = unrolled.programs[0], scanned.programs[0]
  assert s.name == u.name == "train" and s.estimate_source.endswith("extrapolated to 6 scanned blocks from compiles of 1 and 2")
  assert s.flops == pytest.approx(u.flops, rel=0.03)
  assert s.estimate_s == pytest.approx(u.estimate_s, rel=0.5)


@needs_libtpu
@pytest.mark.parametrize("scan", ["false", "true"])
def test_splash_attention_is_in_the_tpu_step_and_counted(tmp_path, sft_data, scan):
  """Compiled for TPU, Llama blocks attend with the splash kernel (rows of 128 tokens, heads of 128): each
  block's fwd, dq and dkv kernels are in the train step (a scanned body's by its trip count), and plan adds
  their analytic flops, which the cost model cannot see, to the compiler's."""
  from conftest import make_tiny_llama

  from jaxft.models import splash
  model = make_tiny_llama(tmp_path / "wide", num_attention_heads=2, num_key_value_heads=1, hidden_size=256,
                          max_position_embeddings=256)
  r = jaxft("plan", *lm_overrides(model, sft_data, tmp_path / "run"), "data.max_length=128", "train.batch_size=8",
            f"model.scan_layers={scan}", "--topology", "v5e:2x2", "--quick", "--json")
  assert r.returncode == 0, r.stderr[-2000:]
  programs = json.loads(r.stdout)["programs"]
  train = programs[0]
  assert [g["name"] for g in programs] == ["train"]  # --quick: the train step only
  assert {kind: calls for kind, (calls, _, _) in train["kernels"].items()} == {"fwd": 2, "dq": 2, "dkv": 2}
  rows = int(train["shape"].split(" x ")[0]) // 4  # packed rows per chip
  fwd = splash.cost("fwd", (rows * 2, 128, 128), (rows * 2, 128, 128), 4)[0]  # f32 compute, 2 heads a row
  assert train["kernels"]["fwd"][1] == pytest.approx(2 * fwd)
  assert "6 splash attention kernel calls counted analytically" in train["estimate_source"]


@needs_libtpu
def test_accumulated_micro_batches_cost_the_whole_step(tmp_path, tiny_llama, sft_data):
  """train.micro_batch_size: the step scans its micro-batches, which the cost model counts once; plan's
  flops are those of the whole batch, as without accumulation."""
  from jaxft.config import load_config
  base = lm_overrides(tiny_llama["tied"], sft_data, tmp_path / "run") + ("data.pack=false", "data.buckets=[64]")
  whole, micro = (_plan(load_config(None, base + (f"train.micro_batch_size={m}",)), "v5e:2x2") for m in ("null", "4"))
  w, m = whole.programs[0], micro.programs[0]
  assert m.estimate_source.endswith("extrapolated to 4 micro-batches from compiles of 1 and 2")
  assert m.flops == pytest.approx(w.flops, rel=0.1)
  assert m.peak_bytes < w.peak_bytes  # a quarter of the activations live at once


@needs_libtpu
@pytest.mark.slow
def test_llama_1b_shape_plans_on_a_v5p_slice(tmp_path, tiny_llama, sft_data):
  """No weights: the published 1B config alone, FSDP over 4 v5p chips, blocks scanned (train step only:
  --search's quick plan). Per chip: a quarter of the 1.24B f32 params, twice that of AdamW state. (The 8B
  config plans the same way; its three TPU compilations take 3.5 minutes here against the 1B's 1.3.)"""
  from jaxft import plan
  from jaxft.config import load_config
  cfg = load_config(None, lm_overrides("configs/shapes/llama-3.2-1b", sft_data, tmp_path / "run") + (
      f"model.tokenizer={tiny_llama['tied']}", "parallel.mesh.fsdp=-1", "parallel.mesh.data=1",
      "precision.compute=bfloat16", "model.remat=block", "model.scan_layers=true"))
  p = plan.plan(cfg, "v5p:2x2x1", log=lambda *a, **k: None, quick=True)
  train = p.programs[0]
  n = 1_235_814_400  # Llama-3.2-1B's params (its output layer tied to the embeddings)
  assert p.fits and train.params_bytes == pytest.approx(4 * n / 4, rel=0.01)
  assert train.opt_bytes == pytest.approx(2 * train.params_bytes, rel=0.01)
  tokens = 8 * 64  # rows x length of the step's batch
  assert 6 * n * tokens < train.flops * 4 < 10 * n * tokens  # 6N per token, plus the recomputed forward
