"""model.quantize (QLoRA's frozen base): each format within its error, a GGUF file's own blocks kept exactly,
the quantized model computing what its dequantized kernels compute, a LoRA run on a quantized base that
learns and exports, the bytes held, and one-line errors."""
import json

import jax
import numpy as np
import pytest
from conftest import jaxft, lm_overrides, make_tiny_llama
from test_llama import write_gguf

from jaxft import quantize, rules
from jaxft.config import load_config
from jaxft.errors import JaxftError
from jaxft.experiment import build

QUIET = dict(log=lambda *_: None)


@pytest.mark.parametrize("kind", ["int8", "nf4", "gguf"])
def test_each_format_is_within_its_error(kind):
  """Dequantized weights within each format's bound: int8 half a step of its column's scale; nf4 half the
  widest gap between NormalFloat levels times the block's absmax; Q4_1 half a step of its block."""
  w = np.random.default_rng(0).normal(size=(128, 96)).astype(np.float32)
  leaves = quantize.quantize_kernel(w, kind)
  back = np.asarray(quantize.dequantize(leaves, kind))
  err = np.abs(back - w)
  if kind == "int8":
    bound = np.asarray(leaves["kernel_scale"]) / 2
  elif kind == "nf4":
    bound = np.repeat(np.asarray(leaves["kernel_scale"]), 64, axis=0) * np.diff(quantize.NF4).max() / 2
  else:
    bound = np.repeat(np.asarray(leaves["kernel_scale"]), 32, axis=0) / 2
  assert np.all(err <= bound * 1.0001 + 1e-7), (err / bound).max()
  assert err.max() > 0  # (not the float weights themselves)
  held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(leaves))
  assert held < w.nbytes / (3.5 if kind == "int8" else 5)  # 8 bits or 4 bits and a scale a block


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
  """A tiny Llama whose projections' inputs (64, 128) divide into nf4's and GGUF's blocks."""
  return make_tiny_llama(tmp_path_factory.mktemp("tiny64") / "m", tie=True, hidden_size=64, intermediate_size=128)


def _cfg(model, data, run_dir, *extra):
  return load_config(None, lm_overrides(model, data, run_dir) + ("lora.preset=all", "lora.rank=4") + extra)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_the_quantized_model_computes_its_dequantized_kernels(tiny64, sft_data, tmp_path, kind):
  """Every projection computes x @ dequantize(kernel) (+ bias): the same outputs as the model given those float
  kernels, in training (LoRA interceptor on top) and evaluation; embeddings and norms stay as loaded."""
  exp = build(_cfg(tiny64, sft_data, tmp_path / "run", f"model.quantize={kind}"), **QUIET)
  params = exp.initial_state().params
  flat = rules.flat(params)
  assert sum(p.endswith("/kernel_q") for p in flat) == 14 and not any(p.endswith("proj/kernel") for p in flat)
  plain = build(_cfg(tiny64, sft_data, tmp_path / "run"), **QUIET)
  floats = quantize.dequantized(jax.device_get(params), kind)
  ids = np.asarray([exp.splits["test"].fields["ids"][0]])
  for train in (False, True):
    got = exp.apply(params, {"input_ids": ids}, train)[0]
    want = plain.apply(floats, {"input_ids": ids}, train)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-5)
  held, as_floats = quantize.param_bytes(params)
  assert held < as_floats


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "Q4_0"])
def test_a_gguf_files_blocks_are_kept_as_they_are(tiny64, sft_data, tmp_path, qtype):
  """model.quantize=gguf holds the file's own blocks (llama's q / k permutation undone on the output axis):
  dequantized, exactly the weights the float load of the same file reads."""
  path = write_gguf(tiny64, tmp_path / f"tiny.{qtype}.gguf", qtype)
  exp = build(_cfg(path, sft_data, tmp_path / "run", "model.quantize=gguf"), **QUIET)
  plain = build(_cfg(path, sft_data, tmp_path / "run"), **QUIET)
  q, f = rules.flat(quantize.dequantized(jax.device_get(exp.initial_state().params), "gguf")), rules.flat(
      jax.device_get(plain.initial_state().params))
  assert sorted(q) == sorted(f)
  for p, x in f.items():
    np.testing.assert_array_equal(q[p], x, err_msg=p)
  kept = rules.flat(exp.initial_state().params)
  assert any(p.endswith("kernel_min") for p in kept) == (qtype == "Q4_1")


def test_qlora_run_learns_and_exports_merged_float_weights(tiny64, sft_data, tmp_path):
  """LoRA on an nf4 base: the held-out loss falls; `jaxft export` writes float kernels (dequantized, adapters
  merged) that compute what the adapted quantized model did."""
  overrides = lm_overrides(tiny64, sft_data, tmp_path / "run") + (
      "lora.preset=all", "lora.rank=4", "model.quantize=nf4", "train.epochs=2", "optim.lr=1e-2")
  before = jaxft("eval", *overrides, "--json")
  r = jaxft("train", *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "model.quantize=nf4: 14 projection kernels kept quantized" in r.stdout + r.stderr
  after = jaxft("eval", *overrides, "--json")
  b, a = json.loads(before.stdout.splitlines()[-1]), json.loads(after.stdout.splitlines()[-1])
  assert a["loss"] < b["loss"] - 1.0, (b, a)
  e = jaxft("export", *overrides, f"--out={tmp_path / 'merged'}")
  assert e.returncode == 0, e.stderr[-2000:]
  merged = build(load_config(None, lm_overrides(tmp_path / "merged", sft_data, tmp_path / "r2")), **QUIET)
  ids = np.asarray([merged.splits["test"].fields["ids"][0]])
  ours = np.asarray(merged.apply(merged.initial_state().params, {"input_ids": ids})[0])
  from jaxft import runs
  exp, _, _, state = runs.open_state(load_config(None, overrides), None, "checking", lambda *_: None, required=True)
  np.testing.assert_allclose(np.asarray(exp.apply(state.params, {"input_ids": ids})[0]), ours, atol=1e-4)


def test_bad_quantize_settings_are_one_line_errors(tiny64, sft_data, tmp_path):
  with pytest.raises(JaxftError, match="model.quantize=nf4 keeps the base frozen and quantized: train LoRA"):
    load_config(None, lm_overrides(tiny64, sft_data, tmp_path / "run") + ("model.quantize=nf4",))
  with pytest.raises(JaxftError, match="'model.quantize' must be int8, nf4 or gguf"):
    _cfg(tiny64, sft_data, tmp_path / "run", "model.quantize=int4")
  with pytest.raises(JaxftError, match="model.quantize=gguf keeps a GGUF file's own blocks; .* is not a GGUF file"):
    build(_cfg(tiny64, sft_data, tmp_path / "run", "model.quantize=gguf"), **QUIET)
  small = make_tiny_llama(tmp_path / "small", tie=True)  # hidden 32: not a multiple of nf4's 64-value blocks
  with pytest.raises(JaxftError, match="a kernel of 32 inputs does not divide into blocks of 64"):
    build(_cfg(small, sft_data, tmp_path / "run", "model.quantize=nf4"), **QUIET).initial_state()


def test_inspect_shows_the_bytes_held_each_way(tiny64, sft_data, tmp_path):
  from rich.console import Console

  from jaxft import inspect, parallel
  exp = build(_cfg(tiny64, sft_data, tmp_path / "run", "model.quantize=nf4"), **QUIET)
  console = Console(record=True, width=160)
  inspect.report(exp, parallel.make_mesh(exp.cfg.parallel.mesh), console=console)
  line = next(l for l in console.export_text().splitlines() if l.startswith("model.quantize=nf4"))
  held, floats = quantize.param_bytes(jax.eval_shape(exp.initial_state).params)
  assert f"{floats / held:.2f}x" in line and floats / held > 1.5, line
