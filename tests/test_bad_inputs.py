"""Bad input, as a user types it: a one-line error naming the culprit, exit 2, no traceback, and nothing
left behind (issue 12; more cases come with the rest of that issue)."""
import subprocess
import sys

import pytest

from conftest import tiny_overrides

CASES = [  # (command, overrides, text the error line must hold)
    ("inspect", ("freeze=[bert/(]",), "freeze rule 'bert/(' is not a valid regex: missing ), unterminated subpattern"),
    ("inspect", ("optim.groups=[{match: '[', lr_mult: 2}]",), "optim.groups match '[' is not a valid regex"),
    ("inspect", ("lora.targets=['*query']",), "lora target '*query' is not a valid regex: nothing to repeat"),
    ("inspect", ("sharding.rules=[['(', [null]]]",), "sharding rule '(' is not a valid regex"),
    ("inspect", ("freeze=[.*]",), "the run trains nothing: the freeze rules"),
    ("inspect", ("phases=[{name: a, steps: 2}, {name: b, freeze: ['.*'], steps: 2}]",), "phase 'b' trains nothing"),
    ("inspect", ("train_only=[x/.*]",), "freeze rule 'x/.*' matches no parameter path (paths look like: bert/"),
    ("inspect", ("data.max_length=100", "data.buckets=null"), "data.max_length=100 is longer than"),
    ("inspect", ("parallel.mesh.fsdp=4",), "needs a multiple of 4 devices; there are 1"),
    ("inspect", ("parallel.mesh.data=2",), "needs 2 devices; there are 1"),
    ("inspect", ("optim.learning_rate=1e-3",), "unknown config key 'optim.learning_rate'; did you mean 'optim.lr'?"),
    ("inspect", ("model.task=ner",), "config key 'model.task' must be one of sequence_classification"),
    ("inspect", ("train.best_metric=f1",), "'train.best_metric' is 'f1'; sequence_classification reports loss"),
    ("inspect", ("data.text_column=review",), "the training data has no column 'review' (columns: text, label)"),
]


def jaxft(*args):
  return subprocess.run([sys.executable, "-m", "jaxft.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command,overrides,message", CASES, ids=[c[1][0][:40] for c in CASES])
def test_one_line_error_and_exit_2(tiny_bert, tiny_data, tmp_path, command, overrides, message):
  r = jaxft(command, *tiny_overrides(tiny_bert, tiny_data, tmp_path / "run"), *overrides)
  last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
  assert r.returncode == 2 and last.startswith("error: ") and message in last, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_failed_train_leaves_nothing_behind(tiny_bert, tiny_data, tmp_path):
  r = jaxft("train", *tiny_overrides(tiny_bert, tiny_data, tmp_path / "run"), "freeze=[.*]")
  assert r.returncode == 2 and "trains nothing" in r.stderr
  assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file(tiny_bert, tiny_data, tmp_path):
  (tmp_path / "run").write_text("not a dir")
  r = jaxft("train", *tiny_overrides(tiny_bert, tiny_data, tmp_path / "run"))
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
      f"error: run_dir {tmp_path / 'run'} exists and is not a directory"
  assert (tmp_path / "run").read_text() == "not a dir"
