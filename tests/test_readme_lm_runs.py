"""README's SFT, DPO and GRPO lines (ELSEWHERE in test_readme_runs.py) on the real SmolLM2: a file of their own,
so that the suite's two workers (pytest -n 2 --dist loadfile) run them beside the other README lines."""
import re
import subprocess
import sys

import pytest
from conftest import jaxft_calls
from test_readme_runs import ROOT, usage_lines


@pytest.mark.slow
@pytest.mark.registry
def test_readme_lm_lines_run(tmp_path):
  """README's SFT, DPO and GRPO lines on the real SmolLM2-135M-Instruct GGUF and the movie reviews, as typed, with
  a few examples each: the data made, each trained, its test metrics printed."""
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  lines = [line for line in usage_lines() if " ".join(line[0]).startswith(
      ("python benchmarks/make_sft_data.py", "jaxft train configs/grpo_sentiment.yaml"))]
  assert len(lines) == 3
  calls = []
  for args in (args for line in lines for args in line):
    if args[0] == "python":
      made = subprocess.run([sys.executable, str(ROOT / args[1]), *args[2:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
      assert made.returncode == 0, made.stderr[-2000:]
    else:
      calls.append(args[1:] + ["data.limit={train: 16, validation: 8, test: 8}", "task.eval_examples=8", "train.keep=1"])
  results = jaxft_calls(calls, timeout=1800, cwd=tmp_path)
  for args, r in zip(calls, results):
    assert r.returncode == 0, f"jaxft {' '.join(args)}: exit {r.returncode}\n{r.stderr[-2000:]}"
    assert re.search(r"^test loss .*exact_match [\d.]+", r.stdout, re.M), (args, r.stdout)
  assert "reward_accuracy" in results[1].stdout and "reward" in results[2].stdout
