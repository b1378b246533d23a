"""Bad input, as a user types it: a one-line error naming the culprit, exit 2, no traceback, and nothing
left behind. The command lines run one after another in one process (tests/helpers/cli_calls.py)."""
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import jaxft, jaxft_calls, tiny_overrides

from jaxft import formats

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
    ("inspect", ("task.name=ner",), "config key 'task.name' must be one of sequence_classification"),
    ("inspect", ("phases_preset=lpft",), "config key 'phases_preset' must be one of lp_ft, gradual_unfreeze, got 'lpft'"),
    ("inspect", ("train.best_metric=f1",), "'train.best_metric' is 'f1'; sequence_classification reports loss"),
    ("inspect", ("task.text_column=review",), "the training data has no column 'review' (columns: text, label)"),
    ("bench", ("--length=100",), "bench --length=100 is longer than"),
    ("train", ("run_dir=/proc/jaxft_x/run",), "cannot create run_dir /proc/jaxft_x/run: No such file or directory"),
    ("inspect", ("optim.groups=[{match: x, lr_mult: 1, lr_mult: 2}]",), "key 'lr_mult' is given twice in one mapping"),
    ("inspect", ("foo.bar=1",), "unknown config key 'foo.bar'; none is close: the top-level keys are run_dir"),
    ("inspect", ("model.name=pypi:six==1.16.0/../../..",), "the path inside the package may not contain '..'"),
    ("soup", ("run_dir=/tmp/jaxft_no_such_run/a",), "run_dir /tmp/jaxft_no_such_run/a does not exist: train first"),
    ("interpolate", ("run_dir=/tmp/jaxft_no_such_run/b",), "run_dir /tmp/jaxft_no_such_run/b does not exist"),
    ("export", ("run_dir=/tmp/jaxft_no_such_run/c", "--out=/tmp/jaxft_no_such_run/out"),
     "run_dir /tmp/jaxft_no_such_run/c does not exist"),
]


TORCH_ZIP = Path(__file__).parent / "fixtures" / "torch_pickles" / "pytorch_model.bin"  # torch.save's zip format


def half(path: Path) -> bytes:
  data = path.read_bytes()
  return data[:len(data) // 2]


WEIGHTS = [  # (fixture dir, weights file written in its place, its bytes from the good file, the error line's text)
    ("pt", "model.safetensors", half, "cannot read {path}: SafetensorError"),
    ("flax", "flax_model.msgpack", half, "cannot read {path}: ValueError"),
    ("pt", "pytorch_model.bin", lambda _: half(TORCH_ZIP), "cannot read PyTorch pickle {path}: BadZipFile"),
    ("pt", "model.safetensors", lambda p: random.Random(0).randbytes(p.stat().st_size), "cannot read {path}: "),
]

GOOD_ROWS = '{"text": "good movie", "label": "pos"}\n{"text": "bad film", "label": "neg"}\n'
ONE_CLASS = '{"text": "good", "label": "pos"}\n' * 20
NER = ("task.name=token_classification", "data.validation=null", "data.test=null")
DATA = [  # (file, its text or bytes, overrides, the error line's text)
    ("t.jsonl", GOOD_ROWS.encode() + b'{"text": "\xe9", "label": "pos"}\n', (), "{path}:3: not UTF-8 text (byte 0xe9)"),
    ("t.csv", b"text,label\ngood,pos\nbad \xff,neg\n", (), "{path}:3: not UTF-8 text (byte 0xff)"),
    ("t.conll", b"good O\nfilm\tB-X\n\n\x80 O\n", NER, "{path}:4: not UTF-8 text (byte 0x80)"),
    ("t.jsonl", GOOD_ROWS + '{"text": "fun"}\n', (), "{path}:3: no key 'label' (keys: text)"),
    ("t.jsonl", GOOD_ROWS + '\n{"label": "pos"}\n', (), "{path}:4: no key 'text' (keys: label)"),
    ("t.jsonl", GOOD_ROWS + '{"text": null, "label": "pos"}\n', (), "{path}:3: 'text' is null, expected a string"),
    ("t.jsonl", GOOD_ROWS + '{"text": 5, "label": "pos"}\n', (), "{path}:3: 'text' is an integer (5), expected a"),
    ("t.jsonl", GOOD_ROWS + '{"text": ["fun"], "label": "neg"}\n', (), "{path}:3: 'text' is a list (['fun'])"),
    ("t.csv", "text,label\ngood,pos\nbad film\nfun,pos\n", (), "{path}:3: 1 field(s) where the header has 2"),
    ("t.jsonl", ONE_CLASS, ("data.validation=null", "data.test=null"),
     "task.label_column 'label' has one class only, 'pos', in every split: nothing to learn"),
    ("t.jsonl", ONE_CLASS, (), "one class only in task.label_column 'label': 'pos' (validation / test have ['neg'])"),
    ("t.conll", "good O\nfilm O\n\nbad O\n", NER, "task.tags_column 'tags' has one class only, 'O', in every split"),
]


def assert_one_line_error(r, message):
  last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
  assert r.returncode == 2 and last.startswith("error: ") and message in last, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def damaged_model(tiny_bert, root: Path, fmt, name, damage) -> Path:
  model = shutil.copytree(tiny_bert[fmt], root / "model")  # a copy: the session's fixture stays whole
  good = formats.find(model).rename(root / "good")
  (model / name).write_bytes(damage(good))
  return model


def data_file(root: Path, name, content) -> Path:
  path = root / name
  (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
  return path


@pytest.fixture(scope="module")
def calls(tiny_bert, tiny_data, tmp_path_factory):
  """Every case of this file as a `jaxft` command line, all run in one process (jax starts once): {case id:
  (its directory, the finished call)}."""
  cases = {}

  def case(cid, command, *overrides):
    root = tmp_path_factory.mktemp(re.sub(r"\W", "_", cid)[:30])
    cases[cid] = (root, command, overrides)
    return root

  for command, overrides, _ in CASES:
    case("case:" + overrides[0], command, *overrides)
  case("freeze_all", "train", "freeze=[.*]")
  (case("run_dir_file", "train") / "run").write_text("not a dir")
  for cid, (fmt, name, damage, _) in zip(WEIGHT_IDS, WEIGHTS):
    root = case(cid, "inspect")
    cases[cid] = (root, "inspect", (f"model.name={damaged_model(tiny_bert, root, fmt, name, damage)}",))
  for cid, (name, content, overrides, _) in zip(DATA_IDS, DATA):
    root = case(cid, "inspect")
    cases[cid] = (root, "inspect", (f"data.train={data_file(root, name, content)}", *overrides))
  root = case("symlink_loop", "inspect")
  (root / "loop").symlink_to(root / "loop")
  cases["symlink_loop"] = (root, "inspect", (f"model.name={root / 'loop'}",))
  root = case("bad_config_json", "inspect")
  model = shutil.copytree(tiny_bert["pt"], root / "model")
  (model / "config.json").write_text('{"model_type": "bert",\n')
  cases["bad_config_json"] = (root, "inspect", (f"model.name={model}",))
  root = case("truncated_gguf", "inspect")
  header = b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (3).to_bytes(8, "little")
  (root / "m.gguf").write_bytes(header)  # 5 tensors and 3 metadata fields announced; the file ends there
  cases["truncated_gguf"] = (root, "inspect", (f"model.name={root / 'm.gguf'}",))
  root = case("one_class_named", "inspect")
  cases["one_class_named"] = (root, "inspect", (f"data.train={data_file(root, 't.jsonl', ONE_CLASS)}",
                                                "task.label_names=[neg, pos]"))
  argvs = [(command, *tiny_overrides(tiny_bert, tiny_data, root / "run", "pt", *overrides))
           for root, command, overrides in cases.values()]
  return {cid: (root, r) for (cid, (root, *_)), r in zip(cases.items(), jaxft_calls(argvs))}


@pytest.mark.parametrize("command,overrides,message", CASES, ids=[c[1][0][:40] for c in CASES])
def test_one_line_error_and_exit_2(calls, command, overrides, message):
  assert_one_line_error(calls["case:" + overrides[0]][1], message)


def test_failed_train_leaves_nothing_behind(calls):
  root, r = calls["freeze_all"]
  assert r.returncode == 2 and "trains nothing" in r.stderr
  assert not (root / "run").exists()


def test_run_dir_that_is_a_file(calls):
  root, r = calls["run_dir_file"]
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
      f"error: run_dir {root / 'run'} exists and is not a directory"
  assert (root / "run").read_text() == "not a dir"


WEIGHT_IDS = ["safetensors_half", "msgpack_half", "torch_zip_half", "random_bytes"]


@pytest.mark.parametrize("cid,name,message", [(i, w[1], w[3]) for i, w in zip(WEIGHT_IDS, WEIGHTS)], ids=WEIGHT_IDS)
def test_damaged_weights_name_the_file(calls, cid, name, message):
  root, r = calls[cid]
  assert_one_line_error(r, message.format(path=root / "model" / name))


DATA_IDS = ["jsonl_utf8", "csv_utf8", "conll_utf8", "no_label", "no_text", "null_text", "number_text", "list_text",
            "csv_short_row", "one_class", "one_class_in_train", "ner_one_tag"]


@pytest.mark.parametrize("cid,name,message", [(i, d[0], d[3]) for i, d in zip(DATA_IDS, DATA)], ids=DATA_IDS)
def test_bad_data_file_names_file_and_line(calls, cid, name, message):
  root, r = calls[cid]
  assert_one_line_error(r, message.format(path=root / name))


def test_one_class_in_train_with_label_names_is_a_warning(calls):
  """The label names list the class that validation / test bring: the run may be meant, so it goes on."""
  r = calls["one_class_named"][1]
  assert r.returncode == 0, r.stderr[-2000:]
  assert "warning: the training data has one class only in task.label_column 'label'" in " ".join(r.stderr.split())


@pytest.mark.parametrize("cid,message", [
    ("symlink_loop", "{root}/loop: a symlink loop (a link that leads back to itself)"),
    ("bad_config_json", "{root}/model/config.json: not valid JSON (line 2, column 1: Expecting property name"),
    ("truncated_gguf", "cannot read {root}/m.gguf (24 bytes): truncated, damaged or not a GGUF file"),
])
def test_unreadable_models_name_the_file(calls, cid, message):
  root, r = calls[cid]
  assert_one_line_error(r, message.format(root=root))


def test_bad_numbers_on_the_command_line():
  r = jaxft("generate", "--prompt", "hi", "--max-new-tokens", "-1")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
      "jaxft generate: error: argument --max-new-tokens: must be >= 1, got -1"
