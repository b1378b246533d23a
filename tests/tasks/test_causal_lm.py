"""causal_lm and sft: which tokens are trained, packing, the loss over micro-batches, fail-loud inputs, a run that
learns and generates, LoRA export, and an 8-device FSDP x TP run of a tiny Llama matching one device."""
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import jaxft, lm_overrides, xla_flags
from test_packing import grads_and_loss

from jaxft.config import load_config
from jaxft.data import batching
from jaxft.errors import JaxftError
from jaxft.experiment import PACK_SLOTS, build

QUIET = dict(log=lambda *_: None)


@pytest.fixture
def lm_cfg(tiny_llama, sft_data, tmp_path):
  def make(*extra, model="tied", data=None, task="sft"):
    return load_config(None, lm_overrides(tiny_llama[model], data or sft_data, tmp_path / "run", task) + extra)
  return make


def trained_text(exp, i, split="train"):
  ex, tok = exp.splits[split], exp.backbone.processor
  ids, targets = ex.fields["ids"][i], ex.fields["targets"][i]
  return tok.decode(ids[targets > 0]), tok.decode(ids[targets == 0])


def test_sft_trains_the_response_only(lm_cfg, sft_data):
  exp = build(lm_cfg(), **QUIET)
  first = json.loads((sft_data / "train.jsonl").read_text().splitlines()[0])
  trained, rest = trained_text(exp, 0)
  assert trained == f"{first['response']}<|im_end|>\n"  # the answer and the template's end of turn
  assert rest == f"<|im_start|>user\n{first['prompt']}<|im_end|>\n<|im_start|>assistant\n"
  prompt = exp.backbone.processor.decode(exp.splits["train"].meta["prompts"][0])
  assert prompt == rest  # generation starts where the answer does


def test_sft_without_a_chat_template_trains_response_and_eos(lm_cfg, tiny_llama, tmp_path):
  plain = tmp_path / "plain"
  shutil.copytree(tiny_llama["tied"], plain)
  tok_cfg = json.loads((plain / "tokenizer_config.json").read_text())
  tok_cfg.pop("chat_template", None)
  (plain / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
  (plain / "chat_template.jinja").unlink(missing_ok=True)
  exp = build(lm_cfg(f"model.name={plain}"), **QUIET)
  trained, rest = trained_text(exp, 0)
  assert rest.startswith("review: ") and trained in ("positive<|im_end|>", "negative<|im_end|>")
  assert trained.startswith(" ") is False and not rest.endswith(" ")


def test_chat_messages_train_every_assistant_turn(lm_cfg, tmp_path):
  conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the movie"},
          {"role": "assistant", "content": "good"}, {"role": "user", "content": "and the plot"},
          {"role": "assistant", "content": "bad"}]
  for split in ("train", "validation", "test"):
    (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({"messages": conv}) for _ in range(20)))
  exp = build(lm_cfg(data=tmp_path), **QUIET)
  trained, _ = trained_text(exp, 0)
  assert trained == "good<|im_end|>\nbad<|im_end|>\n"
  assert exp.splits["test"].meta["answers"][0] == "bad"


def test_bad_sft_inputs_are_one_line_errors(lm_cfg, tmp_path, tiny_bert):
  for split in ("validation", "test"):
    (tmp_path / f"{split}.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
  train = tmp_path / "train.jsonl"
  train.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" +
                   json.dumps({"messages": [{"role": "user", "content": "the movie"}]}) + "\n")
  with pytest.raises(JaxftError, match=r"train.jsonl:2: 'messages' must be .* ending with an assistant message"):
    build(lm_cfg(data=tmp_path), **QUIET)
  long_prompt = " ".join(["the movie"] * 40)
  train.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" +
                   json.dumps({"prompt": long_prompt, "response": "good"}) + "\n")
  with pytest.raises(JaxftError, match=r"train.jsonl:2: no token of it is trained \(its response starts past "
                                       r"data.max_length=64"):
    build(lm_cfg(data=tmp_path), **QUIET)
  train.write_text(json.dumps({"text": "a"}) + "\n")
  with pytest.raises(JaxftError, match=r"train.jsonl:1: no 'messages' and no 'prompt' / 'response'"):
    build(lm_cfg(data=tmp_path), **QUIET)
  with pytest.raises(JaxftError, match="needs a causal LM"):
    build(lm_cfg(f"model.name={tiny_bert['pt']}"), **QUIET)


@pytest.mark.parametrize("task", ["sft", "causal_lm"])
def test_packed_loss_and_gradients_equal_unpacked(lm_cfg, tiny_data, task):
  exp = build(lm_cfg(data=tiny_data if task == "causal_lm" else None, task=task), **QUIET)
  ex, idx = exp.splits["train"], np.arange(16)
  unpacked = batching.collate(ex, idx, [64], exp.task.collate)
  packed = batching.collate_packed(ex, idx, exp.task.collate_packed, 64, PACK_SLOTS, 2)
  assert packed["input_ids"].shape[0] < 16 and packed["weights"].sum() == unpacked["weights"].sum() > 0
  (loss_u, grads_u), (loss_p, grads_p) = grads_and_loss(exp, unpacked), grads_and_loss(exp, packed)
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_p, grads_u)


def test_sft_computes_logits_where_it_trains_only(lm_cfg, tiny_data):
  """SFT batches carry each row's trained positions (a bound for the split, not per batch): the loss and
  gradients equal those of logits at every position. Rows the examples fill need every position."""
  exp = build(lm_cfg(), **QUIET)
  ex, idx = exp.splits["train"], np.arange(16)
  for batch in (batching.collate(ex, idx, [64], exp.task.collate),  # 4 examples a row: a bound of 20 < 64 / 2
                batching.collate_packed(ex, idx, exp.task.collate_packed, 64, 4, 2)):
    at_BxP = batch["logit_positions"]
    assert at_BxP.shape[1] <= 32 and batch["labels"].shape == batch["weights"].shape == at_BxP.shape
    full = {k: v for k, v in batch.items() if k not in ("labels", "weights", "logit_positions")}
    full["labels"] = np.roll(batch["input_ids"], -1, axis=1)
    full["weights"] = np.zeros(batch["input_ids"].shape, np.float32)
    np.put_along_axis(full["weights"], at_BxP, batch["weights"], axis=1)
    np.testing.assert_array_equal(np.take_along_axis(full["labels"], at_BxP, 1)[batch["weights"] > 0],
                                  batch["labels"][batch["weights"] > 0])
    (loss, grads), (loss_full, grads_full) = grads_and_loss(exp, batch), grads_and_loss(exp, full)
    np.testing.assert_allclose(loss, loss_full, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, grads_full)
  lm = build(lm_cfg(data=tiny_data, task="causal_lm"), **QUIET)
  assert "logit_positions" in batching.collate(lm.splits["train"], idx, [64], lm.task.collate)  # padding
  assert "logit_positions" not in batching.collate(lm.splits["train"], idx, [16], lm.task.collate)


def test_causal_lm_documents_packed_or_concatenated(lm_cfg, tiny_data):
  packed = build(lm_cfg(data=tiny_data, task="causal_lm"), **QUIET)
  stream = build(lm_cfg("data.pack=false", data=tiny_data, task="causal_lm"), **QUIET)
  n_docs = len((tiny_data / "train.jsonl").read_text().splitlines())
  assert packed.pack and len(packed.splits["train"]) == n_docs  # short documents: one example each
  tokens = sum(map(len, packed.splits["train"].fields["ids"]))
  # the same tokens in rows of 64 (a last row of one token would predict nothing: dropped)
  assert sum(map(len, stream.splits["train"].fields["ids"])) == tokens - (tokens % 64 == 1)
  assert not stream.pack and set(stream.splits["train"].lengths[:-1]) == {64}
  eos = packed.task.eos_id
  assert all(x[-1] == eos for x in packed.splits["train"].fields["ids"])


def test_loss_is_the_token_mean_over_micro_batches(lm_cfg):
  """Micro-batches of unequal token counts: the accumulated step equals the whole batch's."""
  results = []
  for micro in (None, 4):
    exp = build(lm_cfg("data.pack=false", "train.dropout=false", f"train.micro_batch_size={micro or 'null'}"),
                **QUIET)
    batch = batching.collate(exp.splits["train"], np.arange(16), [64], exp.task.collate)
    step = jax.jit(exp.train_step(0))
    state, m = step(exp.initial_state(), batch)
    results.append((float(m["loss"]), jax.device_get(state.params)))
  assert abs(results[0][0] - results[1][0]) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][1], results[1][1])


def test_sft_run_learns_generates_and_exports_with_lora(tiny_llama, sft_data, tmp_path):
  """A LoRA SFT run: the held-out loss falls and exact match rises; `jaxft generate` answers from the best
  checkpoint; `jaxft export` merges the adapters into a plain model directory (safetensors in transformers'
  names: tests/models/test_families.py) that computes what the adapted model did."""
  from jaxft import formats
  overrides = lm_overrides(tiny_llama["tied"], sft_data, tmp_path / "run") + (
      "lora.preset=all", "lora.rank=4", "train.epochs=3", "optim.lr=1e-2")
  before = jaxft("eval", *overrides, "--json")
  assert before.returncode == 0, before.stderr[-2000:]
  r = jaxft("train", *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  after = jaxft("eval", *overrides, "--json")
  b, a = json.loads(before.stdout.splitlines()[-1]), json.loads(after.stdout.splitlines()[-1])
  assert a["loss"] < b["loss"] - 1.0 and a["exact_match"] > b["exact_match"], (b, a)
  assert "exact_match" in r.stdout
  g = jaxft("generate", *overrides, "--prompt", "review: the film was great", "--chat")
  assert g.returncode == 0 and g.stdout.strip() in ("positive", "negative"), (g.stdout, g.stderr[-1000:])
  e = jaxft("export", *overrides, f"--out={tmp_path / 'merged'}")
  assert e.returncode == 0, e.stderr[-2000:]
  merged = build(load_config(None, overrides + (f"model.name={tmp_path / 'merged'}", "lora.preset=null")), **QUIET)
  ids = np.asarray([merged.splits["test"].fields["ids"][0]])
  ours = np.asarray(merged.apply(merged.initial_state().params, {"input_ids": ids})[0])
  names = formats.read(tmp_path / "merged" / "model.safetensors")[0]
  assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora" in k for k in names)
  lora_exp = build(load_config(None, overrides), **QUIET)  # the merged model computes what the adapted one did
  from jaxft.checkpoint import Checkpointer
  from jaxft.experiment import setup
  _, targets = setup(lora_exp, lambda *_: None)
  ckpt = Checkpointer(tmp_path / "run" / "checkpoints", 2)
  step = ckpt.record(ckpt.latest_step()).best_step
  state = ckpt.restore(step, targets[0])[0]
  ckpt.close()
  np.testing.assert_allclose(np.asarray(lora_exp.apply(state.params, {"input_ids": ids})[0]), ours, atol=1e-4)


def test_fsdp_x_tp_on_8_devices_matches_one(tiny_llama, sft_data, tmp_path_factory):
  """The Llama TP rules (column-parallel q/k/v, gate, up; row-parallel o, down; vocab-sharded embeddings)
  with FSDP on top: the same losses as one device, packed and unpacked."""
  from test_parallel import assert_close, side_by_side
  root = tmp_path_factory.mktemp("lm_multidevice")
  shutil.copytree(tiny_llama["untied"], root / "tiny_llama")
  shutil.copytree(sft_data, root / "sft_data")
  common = ",".join(o for o in lm_overrides(root / "tiny_llama", root / "sft_data", "x") if not o.startswith("run_dir"))
  common += ",data.buckets=null,train.epochs=1,train.log_every=1,task.eval_examples=4"
  one, eight = side_by_side(root, [
    (1, {"ref": "", "ref_unpacked": "data.pack=false"}),
    (8, {"fsdp_tp": "parallel.mesh.data=1,parallel.mesh.fsdp=4,parallel.mesh.tensor=2",
         "dp_tp_unpacked": "parallel.mesh.data=4,parallel.mesh.tensor=2,data.pack=false"})], common)
  assert len(one["ref"]) >= 10
  assert_close(eight["fsdp_tp"], one["ref"], "fsdp_tp")
  assert_close(eight["dp_tp_unpacked"], one["ref_unpacked"], "dp_tp_unpacked")


def r_serialize(obj) -> bytes:
  """R's XDR serialisation (format 2) of str / int lists, None, and {"value": list, "names": [...]}."""
  import struct
  out = b""
  if obj is None:
    return struct.pack(">i", 254)
  if isinstance(obj, dict):  # a list (VECSXP) with a names attribute
    out = struct.pack(">ii", 19 | (1 << 9), len(obj["value"])) + b"".join(r_serialize(v) for v in obj["value"])
    names = struct.pack(">ii", 16, len(obj["names"])) + b"".join(_charsxp(n) for n in obj["names"])
    return out + struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _charsxp("names") + names + r_serialize(None)
  if all(isinstance(v, int) for v in obj):
    return struct.pack(f">ii{len(obj)}i", 13, len(obj), *obj)
  return struct.pack(">ii", 16, len(obj)) + b"".join(_charsxp(s) for s in obj)


def _charsxp(s) -> bytes:
  import struct
  if s is None:
    return struct.pack(">ii", 9, -1)
  b = s.encode()
  return struct.pack(">ii", 9 | (8 << 12), len(b)) + b  # UTF-8 marked, as R writes it


def test_jane_austen_builder_reads_an_r_lazy_load_database(tmp_path, monkeypatch):
  """Each novel a character vector in Rdata.rdb (zlib blocks) indexed by Rdata.rdx (gzip): chapters split at
  'CHAPTER <numeral>' / 'Chapter <n>' lines; the last chapter of each novel is test, the one before validation."""
  import gzip
  import struct
  import zlib

  from jaxft.data.sources import builtin
  from jaxft.data.sources.builders import jane_austen
  header = b"X\n" + struct.pack(">iii", 2, 0x040000, 0x020300)
  rdb, index = b"", []
  for b, name in enumerate(jane_austen.BOOKS):
    lines = [name.upper(), "", "By Jane Austen", None]
    for c in range(1, 4):
      lines += [f"CHAPTER {'I' * c}" if b % 2 else f"Chapter {c}", "", f"{name} chapter {c} first line é",
                f"second line {c}", ""]
    block = zlib.compress(header + r_serialize(lines))
    index.append([len(rdb), 4 + len(block)])
    rdb += struct.pack(">I", len(header + r_serialize(lines))) + block
  (tmp_path / "Rdata.rdb").write_bytes(rdb)
  rdx = {"value": [{"value": index, "names": list(jane_austen.BOOKS)}, {"value": [], "names": []}, [1]],
         "names": ["variables", "references", "compressed"]}
  (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header + r_serialize(rdx)))
  monkeypatch.setattr(jane_austen, "ASSET", str(tmp_path))
  splits, _ = builtin.load("jane_austen", tmp_path / "tfds")
  assert {s: len(r) for s, r in splits.items()} == {"train": 6, "validation": 6, "test": 6}
  first = splits["train"][0]
  assert first["text"] == "sensesensibility chapter 1 first line é\nsecond line 1" and first["chapter"] == 1
  assert first["book"] == "Sense & Sensibility"
  assert {r["chapter"] for r in splits["test"]} == {3} and {r["chapter"] for r in splits["validation"]} == {2}


def test_generation_is_greedy_decoding_step_by_step(tiny_llama, sft_data, tmp_path):
  """The compiled loop (left-padded batch, KV cache, stop at EOS) picks the tokens that running the whole
  sequence again for each new token and taking its argmax picks, prompt by prompt."""
  from jaxft import generate as gen
  exp = build(load_config(None, lm_overrides(tiny_llama["untied"], sft_data, tmp_path / "run")), lambda *a: None)
  state = exp.initial_state()
  prompts = [list(p) for p in exp.splits["validation"].meta["prompts"][:3]]
  assert len({len(p) for p in prompts}) > 1  # prompts of several lengths share a left-padded batch
  got = gen.generate(exp, state.params, state.model_state, prompts, 8, batch_size=4)
  for prompt, tokens in zip(prompts, got):
    ids = list(prompt)
    for _ in range(8):
      batch = {"input_ids": np.array([ids], np.int32), "attention_mask": np.ones((1, len(ids)), np.int32)}
      nxt = int(np.argmax(exp.apply(state.params, batch, False, None, state.model_state)[0][0, -1]))
      if nxt == exp.task.eos_id:
        break
      ids.append(nxt)
    assert tokens == ids[len(prompt):]
  assert sum(map(len, got)) > 3
  # GRPO's groups: each prompt's prefill once, its cache copied to `repeat` rows, which continue alike here
  assert gen.generate(exp, state.params, state.model_state, prompts, 8, batch_size=2, repeat=2) == [
      g for g in got for _ in range(2)]


def test_generate_needs_no_training_data(tiny_llama, tmp_path):
  """jaxft generate reads the model (the run's, or as loaded), not the data: files not yet made are no error."""
  from jaxft.generate import generate_text
  cfg = load_config(None, lm_overrides(tiny_llama["untied"], tmp_path / "not_made_yet", tmp_path / "run"))
  text = generate_text(cfg, "the movie was", 4, log=lambda *a: None)
  assert isinstance(text, str)


SHARDED_GENERATION = """
import json, sys
from jaxft import generate as gen
from jaxft.config import load_config
from jaxft.runs import open_state
cfg = load_config(None, tuple(sys.argv[1:]))
exp, par, _, state = open_state(cfg, log=lambda *a: None)
prompts = exp.splits["validation"].meta["prompts"][:8]
split = gen.generate(exp, state.params, state.model_state, prompts, 6, batch_size=8, par=par)
whole = gen.generate(exp, state.params, state.model_state, prompts, 6, batch_size=8)
pairs = gen.generate(exp, state.params, state.model_state, prompts[:4], 6, batch_size=4, par=par, repeat=2)
print(json.dumps({"same": split == whole and pairs == [g for g in whole[:4] for _ in range(2)], "tokens": sum(map(len, split)),
                  "rows": [list(a) for a in gen.program(par, 8)[1].spec], "one_prompt": gen.program(par, 1)[1] is None}))
"""


def test_generation_splits_prompts_over_the_mesh(tiny_llama, sft_data, tmp_path):
  """On a mesh (here data 2 x fsdp 2, fake CPU devices) each batch of prompts is split over the batch axes, as
  evaluation batches are, instead of every device generating the whole batch: the same tokens as one program
  running it whole. A batch the batch shards do not divide (jaxft generate's single prompt) runs whole."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"))
  overrides = lm_overrides(tiny_llama["untied"], sft_data, tmp_path / "run") + (
      "parallel.mesh.data=2", "parallel.mesh.fsdp=2")
  out = subprocess.run([sys.executable, "-c", SHARDED_GENERATION, *overrides], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got == {"same": True, "tokens": got["tokens"], "rows": [["data", "fsdp"]], "one_prompt": True}
  assert got["tokens"] > 8  # something was generated
