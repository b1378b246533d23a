"""The command line as a user meets it: exit codes, one-line errors, inspect output."""

import pytest
from conftest import jaxft, tiny_overrides


def test_bad_override_is_one_line_and_exit_2():
  r = jaxft("train", "optim.lrr=1e-3")
  assert r.returncode == 2
  assert r.stderr.strip() == "error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"


def test_missing_config_file():
  r = jaxft("inspect", "nope.yaml")
  assert r.returncode == 2 and r.stderr.strip() == "error: config file not found: nope.yaml"


def test_inspect_shows_subtrees_status_and_bytes(tiny_bert, tiny_data, tmp_path):
  r = jaxft("inspect", *tiny_overrides(tiny_bert, tiny_data, tmp_path), "freeze_bottom_layers=2",
            "freeze_embeddings=true", "--params")
  assert r.returncode == 0, r.stderr
  lines = {l.split("│")[1].strip(): l for l in r.stdout.splitlines() if l.count("│") > 4}
  assert "frozen" in lines["bert/embeddings"] and "frozen" in lines["bert/encoder/layer/1"]
  assert "trainable" in lines["bert/encoder/layer/2"] and "trainable" in lines["classifier"]
  # frozen subtrees hold no optimizer state; trainable ones hold 2 moments (2x their bytes)
  cols = lambda key: [c.strip() for c in lines[key].split("│")[1:-1]]
  assert cols("bert/embeddings")[4] == "0.00"
  param_mib, opt_mib = float(cols("bert/encoder/layer/2")[3]), float(cols("bert/encoder/layer/2")[4])
  assert param_mib > 0 and abs(opt_mib - 2 * param_mib) <= 0.015
  # --params: one row per param with its PartitionSpec; the mesh is named
  query = lines["bert/encoder/layer/2/attention/self/query/kernel"]
  assert "(32, 32)" in query and "P(None, 'tensor')" in query
  assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1} over 1 cpu devices" in r.stdout


def test_error_text_is_printed_verbatim():
  """Brackets in a message ('[/sub]') are text, not rich markup."""
  r = jaxft("eval", "data.name=files", "data.train=nope.jsonl")
  assert r.returncode == 2
  assert r.stderr.strip() == "error: asset not found: nope.jsonl (a local path, pypi:NAME==VER[/sub] or hf:ORG/NAME)"


def test_overrides_may_follow_the_options():
  from jaxft.cli import _parse
  args, config = _parse(["plan", "configs/lm.yaml", "a.b=1", "--topology", "v5e:2x2", "c.d=2", "--quick"])
  assert (config, args.args, args.topology, args.quick) == ("configs/lm.yaml", ["a.b=1", "c.d=2"], "v5e:2x2", True)
  with pytest.raises(SystemExit):
    _parse(["plan", "--topology", "v5e:2x2", "a.b=1", "--bogus"])
