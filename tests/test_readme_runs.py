"""README's usage lines run, as a new user would type them, with a budget appended (a few examples, one epoch,
a few timed steps): one after another in one process, in a scratch directory. A documented command that stops
working fails here. The lines whose models or data take minutes are in ELSEWHERE, with the tests that run them."""
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import jaxft_calls

ROOT = Path(__file__).resolve().parent.parent
BUDGET = ("data.limit={train: 128, validation: 32, test: 32}", "train.epochs=1", "train.keep=1")  # keep: disk
SMALLER = {"configs/large_batch_lamb.yaml": ("train.batch_size=128",)}  # 1024 > the budget's 64 examples
ELSEWHERE = {  # a README line's first words -> the test that runs its model and data
    "jaxft train configs/ner_wnut16.yaml": "tests/tasks/test_token_classification.py (WNUT-16, slow)",
    "jaxft train configs/vision_fashion_mnist.yaml": "tests/tasks/test_image_classification.py",
    "python benchmarks/make_qa_data.py": "tests/tasks/test_question_answering.py",
    "jaxft train configs/lm_austen.yaml": "tests/tasks/test_causal_lm.py (SmolLM2, slow)",
    "python benchmarks/make_sft_data.py": "tests/test_readme_lm_runs.py (SmolLM2 SFT and DPO, slow)",
    "jaxft train configs/grpo_sentiment.yaml": "tests/test_readme_lm_runs.py (SmolLM2 GRPO, slow)",
    "jaxft generate": "tests/tasks/test_causal_lm.py (SmolLM2 generation, slow)",
    "jaxft eval configs/ner_wnut16.yaml": "tests/tasks/test_token_classification.py (WNUT-16, slow)",
    "jaxft train data.name=tfds:imdb_reviews": "tests/data/test_tfds.py (a TFDS dataset prepared offline)",
}


def usage_lines() -> list[list[str]]:
  """The README's usage block: each line's commands (split at &&), without the comment."""
  text = (ROOT / "README.md").read_text()
  block = text[text.index("jaxft train                                   #"):]
  block = block[:block.index("```")].replace("\\\n", " ")
  return [[shlex.split(c) for c in line.split("#")[0].split("&&")] for line in block.splitlines() if line.strip()]


def budgeted(args: list[str]) -> list[str]:
  if args[1] == "plot":
    return args[1:]
  extra = ["--steps", "2", "--warmup", "1"] if args[1] == "bench" else []
  return args[1:] + extra + list(BUDGET) + [o for a in args for o in SMALLER.get(a, ())]


@pytest.mark.slow
@pytest.mark.registry
def test_readme_usage_lines_run(tmp_path):
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  rows = [{"text": f"{w} film", "label": w} for w in ("good", "bad") * 40]
  (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")  # the eval line's own data
  lines = usage_lines()
  run = [line for line in lines if not any(" ".join(line[0]).startswith(k) for k in ELSEWHERE)]
  assert len(lines) > 25 and len(run) >= len(lines) - len(ELSEWHERE) - 2
  calls = [budgeted(args) for line in run for args in line]
  results = jaxft_calls(calls, timeout=1800, cwd=tmp_path)
  for args, r in zip(calls, results):
    assert r.returncode == 0, f"jaxft {' '.join(args)}: exit {r.returncode}\n{r.stderr[-2000:]}"
  out = {" ".join(args[:3]): r.stdout for args, r in zip(calls, results)}
  assert re.search(r"^test loss .* accuracy [\d.]+ ± [\d.]+ .*\(5 seeds\)$", out["train train.seeds=5 run_dir=runs/5seeds"], re.M)
  assert (tmp_path / "lora_merged" / "config.json").is_file() and (tmp_path / "runs" / "default" / "plot.png").is_file()
