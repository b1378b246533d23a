"""Tiny random BERT checkpoints in Hugging Face layout and a tiny text dataset, made offline."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite compiles with XLA:CPU's backend optimisation off (test processes started here inherit it): compiling
# took about 60% of its time, and its tiny programs run hardly slower. jaxft's own runs and benchmarks keep XLA's
# default; benchmarks/same_results.py checks that shipped configs give the same results from one commit to the next.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()


def xla_flags(*more: str) -> str:
  """XLA_FLAGS for a test's subprocess: the suite's, and `more`."""
  return " ".join((SUITE_XLA_FLAGS, *more))


def optimised_env() -> dict:
  """The environment with XLA's default optimisation, for a subprocess that runs full-size models (unoptimised,
  their random initialisation and updates run several times slower than they compile faster)."""
  return {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(SUITE_XLA_FLAGS, "").strip()}


from jaxft import runtime  # noqa: E402

runtime.quiet_absent_tpu()  # libtpu installed (the test extra has it) on a machine without a TPU: jax skips it

# The longest test files (each over ~3 minutes of one core: many multi-device or multi-process runs), scheduled
# first so that the README's two workers (-n 2 --dist loadfile: a file to a worker) finish together.
LONGEST_FIRST = ("test_readme_lm_runs.py", "test_readme_runs.py", "test_faults.py", "test_parallel.py", "test_plan.py", "test_image_classification.py",
                 "test_causal_lm.py", "test_bad_inputs.py", "test_bench.py", "test_replicas.py",
                 "test_pruning.py", "test_batch_schedule.py")


def pytest_runtest_makereport(item, call):
  """A test that failed fetching an asset says so, and which marker leaves such tests out offline."""
  if call.excinfo is not None and "could not fetch" in str(call.excinfo.value):
    marked = "it is marked registry" if item.get_closest_marker("registry") else "mark it registry"
    call.excinfo.value.add_note(f"{item.nodeid} needs a package registry this machine cannot reach ({marked}; "
                                "offline, run -m 'not registry')")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


WORDS = ["good", "great", "fine", "love", "fun", "bad", "awful", "boring", "hate", "dull",
         "the", "movie", "film", "plot", "was", "and", "a", "very", "not", "story"]
POSITIVE, NEGATIVE = WORDS[:5], WORDS[5:10]


def bert_config(**kw):
  from transformers import BertConfig
  return BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, **kw)


def write_tokenizer(path: Path):
  from transformers import BertTokenizerFast
  (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
  BertTokenizerFast.from_pretrained(path).save_pretrained(path)  # (transformers 5 ignores vocab_file=)


def flax_to_pt_names(params) -> dict:
  """Flax BERT params -> PyTorch state-dict names and layouts (kernels transposed)."""
  from flax import traverse_util
  out = {}
  for keys, x in traverse_util.flatten_dict(params).items():
    x = np.asarray(x)
    *head, leaf = keys
    if leaf == "kernel":
      leaf, x = "weight", x.T
    elif leaf in ("embedding", "scale"):
      leaf = "weight"
    out[".".join([*head, leaf])] = np.ascontiguousarray(x)
  return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
  return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def random_params(module, *inputs) -> dict:
  """A jaxft module's random params (its initialisers, seed 0), as plain numpy arrays."""
  import jax
  return jax.tree.map(np.asarray, module.init(jax.random.PRNGKey(0), *inputs)["params"])


def make_tiny_bert(root: Path) -> dict:
  """{'flax': dir with flax_model.msgpack (as transformers 4's Flax classes wrote), 'pt': dir with PyTorch-named
  model.safetensors}: the same random *base* BertModel weights (no classification head)."""
  from flax import serialization
  from safetensors.numpy import save_file

  from jaxft.models import bert
  config = bert_config()
  ids = np.zeros((1, 2), np.int32)
  params = random_params(bert.BertModel(config), ids, ids + 1)
  flax_dir, pt_dir = root / "flax", root / "pt"
  for d in (flax_dir, pt_dir):
    d.mkdir(parents=True)
    config.save_pretrained(d)
    write_tokenizer(d)
  (flax_dir / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
  pt = flax_to_pt_names(params)  # a PyTorch BertModel state dict, as all-MiniLM ships
  pt["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]  # a buffer, as in real files
  save_file(pt, str(pt_dir / "model.safetensors"), metadata={"format": "pt"})
  return {"flax": flax_dir, "pt": pt_dir, "params": params}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


def make_tiny_data(root: Path) -> Path:
  """A learnable sentiment task: train / validation / test JSONL files."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 256), ("validation", 64), ("test", 64)):
    rows = []
    for _ in range(n):
      label = int(rng.integers(2))
      words = list(rng.choice(WORDS[10:], size=rng.integers(1, 8)))
      words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE if label else NEGATIVE)))
      rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return root


def jaxft(*args, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
  """`jaxft ARGS` in a subprocess (JAXFT_FAULT=fault: see jaxft/faults.py)."""
  env = {**os.environ, "JAXFT_FAULT": fault or ""}
  return subprocess.run([sys.executable, "-m", "jaxft.cli", *args], env=env, capture_output=True, text=True,
                        timeout=timeout)


def jaxft_calls(calls: list, timeout: float = 600, cwd=None) -> list[subprocess.CompletedProcess]:
  """`jaxft ARGS` for each ARGS in `calls`, one after another in one subprocess (tests/helpers/cli_calls.py) run
  in `cwd`: jax starts once, not once per call."""
  with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
    json.dump([[str(a) for a in args] for args in calls], f)
    f.flush()
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "helpers" / "cli_calls.py"), f.name],
                       capture_output=True, text=True, timeout=timeout, cwd=cwd)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
  return [subprocess.CompletedProcess(args, **res) for args, res in zip(calls, results)]


def metric_rows(run_dir, split: str) -> list[dict]:
  """A run's metrics.jsonl rows of one split."""
  return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl") if f'"{split}"' in line]


def stopped_then_resumed(cfg, step: int) -> None:
  """Trains `cfg` in this process, stopped by SIGTERM right after `step` (JAXFT_FAULT), then resumed to its end."""
  from jaxft.errors import Preempted
  from jaxft.train import train
  os.environ["JAXFT_FAULT"] = f"step:{step}:TERM"
  try:
    with pytest.raises(Preempted):
      train(cfg)
  finally:
    del os.environ["JAXFT_FAULT"]
  train(cfg)


def tiny_overrides(tiny_bert, tiny_data, run_dir, fmt="pt", *extra):
  """Overrides for a fast run on the tiny checkpoint and data, then `extra` (with another task.name, the
  sentiment task's task.pooling is left out: a key the task lacks is an error)."""
  other_task = any(e.startswith("task.name=") and e != "task.name=sequence_classification" for e in extra)
  return tuple(o for o in _tiny_base(tiny_bert, tiny_data, run_dir, fmt) if not (other_task and
                                                                                   o.startswith("task.pooling="))) + extra


def _tiny_base(tiny_bert, tiny_data, run_dir, fmt):
  return (f"model.name={tiny_bert[fmt]}", "data.name=files", f"data.train={tiny_data / 'train.jsonl'}",
          f"data.validation={tiny_data / 'validation.jsonl'}", f"data.test={tiny_data / 'test.jsonl'}",
          "data.max_length=32", "data.buckets=[16,32]", "train.batch_size=16", "train.eval_batch_size=32",
          f"run_dir={run_dir}", "train.log_every=2", "optim.lr=3e-3", "task.pooling=mean",
          "freeze_embeddings=false", "train.eval_every=100", "train.checkpoint_every=100")


@pytest.fixture
def tiny_cfg(tiny_bert, tiny_data, tmp_path):
  """A function: extra overrides -> Config for the tiny model and data in a fresh run dir."""
  from jaxft.config import load_config
  return lambda *extra: load_config(None, tiny_overrides(tiny_bert, tiny_data, tmp_path / "run", "pt", *extra))


# ---- tiny Llama-family causal LMs ---------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def llama_tokenizer():
  """A byte-level BPE tokenizer trained on WORDS, with ChatML special tokens and chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=LM_SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([" ".join(WORDS), "positive negative review sentiment user assistant"] * 20, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", chat_template=CHATML)


def llama_config(tie: bool, kind: str = "Llama", **kw):
  """A tiny config of transformers' `{kind}Config` (Llama, Qwen2, Qwen3, ...)."""
  import transformers
  return getattr(transformers, f"{kind}Config")(**{**dict(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                initializer_range=0.3), **kw})  # large: a random model with peaked logits


def make_tiny_llama(root: Path, tie: bool = True, kind: str = "Llama", **config) -> Path:
  """A random Llama-family causal LM (kind: Llama, Qwen3, ...) in Hugging Face layout: config.json,
  model.safetensors in PyTorch names (as transformers' PyTorch save_pretrained writes), tokenizer. Returns the
  directory."""
  from safetensors.numpy import save_file

  from jaxft.models import llama
  cfg = llama_config(tie, kind, **config)
  ids = np.zeros((1, 1), np.int32)
  params = random_params(llama.CausalLM(cfg), ids, ids, llama.visibility({"input_ids": ids}))
  root.mkdir(parents=True, exist_ok=True)
  cfg.save_pretrained(root)
  save_file(flax_to_pt_names(params), str(root / "model.safetensors"), metadata={"format": "pt"})
  llama_tokenizer().save_pretrained(root)
  return root


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_llama")
  return {"tied": make_tiny_llama(root / "tied", tie=True), "untied": make_tiny_llama(root / "untied", tie=False)}


def make_sft_data(root: Path) -> Path:
  """Sentiment as SFT: JSONL prompt / response pairs (train / validation / test) from the tiny text task."""
  (root / "text").mkdir()
  data = make_tiny_data(root / "text")
  for split in ("train", "validation", "test"):
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
    out = [{"prompt": f"review: {r['text']}", "response": "positive" if r["label"] == "pos" else "negative"}
           for r in rows]
    (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in out) + "\n")
  return root


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
  return make_sft_data(tmp_path_factory.mktemp("sft_data"))


def lm_overrides(model: Path, data: Path, run_dir, task: str = "sft"):
  """Overrides for a fast causal-LM run of the tiny Llama on JSONL files (text for causal_lm)."""
  return (f"model.name={model}", f"task.name={task}", "data.name=files", f"data.train={data / 'train.jsonl'}",
          f"data.validation={data / 'validation.jsonl'}", f"data.test={data / 'test.jsonl'}",
          "data.max_length=64", "train.batch_size=16", "train.eval_batch_size=16", f"run_dir={run_dir}",
          "train.log_every=2", "optim.lr=3e-3", "train.eval_every=100", "train.checkpoint_every=100",
          "task.max_new_tokens=4") + (("task.eval_examples=16",) if task == "sft" else ())
