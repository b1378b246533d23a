import dataclasses
from pathlib import Path

import pytest
import yaml

from jaxft.config import Config, dump, load_config
from jaxft.errors import JaxftError

ROOT = Path(__file__).parents[1]


def test_default_yaml_is_the_embedded_default():
  assert yaml.safe_load((ROOT / "configs/default.yaml").read_text()) == yaml.safe_load(dump(Config()))
  assert load_config(str(ROOT / "configs/default.yaml")) == Config()


def test_overrides_are_typed():
  cfg = load_config(None, ("optim.lr=3e-5", "train.epochs=1", "freeze=[a.*, b.*]", "freeze_embeddings=true",
                           "task.label_names=[neg, pos]", "data.validation=null"))
  assert cfg.optim.lr == 3e-5 and isinstance(cfg.optim.lr, float)
  assert cfg.train.epochs == 1.0 and cfg.freeze == ["a.*", "b.*"] and cfg.freeze_embeddings is True
  assert cfg.task.label_names == ["neg", "pos"] and cfg.data.validation is None


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("lr=1", "unknown config key 'lr'; did you mean 'optim.lr'?"),
    ("foo.bar=1", "unknown config key 'foo.bar'; none is close: the top-level keys are run_dir, seed, resume, task"),
    ("train.batch_size=[1,", "override 'train.batch_size=[1,':1:4: not valid YAML: expected the node content"),
    ("optim.groups=[{match: x, lr_mult: 1, lr_mult: 2}]", "override 'optim.groups=[{match: x, lr_mult: 1, lr_mult: "
                                                         "2}]': key 'lr_mult' is given twice in one mapping"),
    ("train.batch_size=abc", "config key 'train.batch_size' expects int, got 'abc'"),
    ("freeze_embeddings=maybe", "config key 'freeze_embeddings' expects bool, got 'maybe'"),
    ("freeze=3", "config key 'freeze' expects a list of str, got 3"),
    ("optim.schedule=exp", "config key 'optim.schedule' must be linear, cosine or constant"),
    ("train.epochs", "override 'train.epochs' is not of the form key=value"),
    ("optim.groups=[{match: x, lr: 2}]", "config key 'optim.groups[0]' must be {match: regex, lr_mult: number"),
    ("optim.layer_decay=1.5", "config key 'optim.layer_decay' must be in (0, 1], got 1.5"),
    ("precision.compute=fp8", "config key 'precision.compute' must be float32 or bfloat16, got 'fp8'"),
    ("lora.rank=0", "config keys 'lora.rank' and 'lora.alpha' must be > 0"),
    ("phases=[{until: {metric: loss}}]", "config key 'phases[0].until' must be {metric: val_<metric>"),
    ("task.name=ner", "config key 'task.name' must be one of sequence_classification"),
    # the families' own keys, checked as each family's TAKES says
    ("model.attention=flash", "config key 'model.attention' must be auto or xla, got 'flash'"),
    ("model.bn=batch", "config key 'model.bn' must be train or frozen, got 'batch'"),
    ("model.image_size=4", "config key 'model.image_size' must be >= 8 pixels, got 4"),
    ("model.layers=2", "config key 'model.layers' sets a depth of model.weights=shapes models only (>= 1), got 2"),
    (("model.scan_layers=true", "lora.preset=qv"), "config key 'model.scan_layers' does not take LoRA adapters yet"),
    # the sources' own keys: only for a source that reads them, checked as it says
    ("data.train=t.jsonl", "config key 'data.train' is not read by data.name=vader_movie_reviews; it is a key of the "
                           "files and image_folder sources"),
    ("data.conll_columns=[1, 2]", "config key 'data.conll_columns' is not read by data.name=vader_movie_reviews; it "
                                  "is a key of the files source"),
    (("data.name=files", "data.train=t.conll", "data.conll_columns=[1]"),
     "config key 'data.conll_columns' must be [token column, tag column], got [1]"),
    (("data.name=files", "data.tfds_dir=/tmp"), "config key 'data.tfds_dir' is not read by data.name=files; it is a "
                                                "key of the builtin and tfds sources"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(JaxftError) as e:
    load_config(None, (override,) if isinstance(override, str) else override)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_yaml_file_errors(tmp_path):
  with pytest.raises(JaxftError, match="config file not found: .*nope.yaml"):
    load_config(str(tmp_path / "nope.yaml"))
  bad = tmp_path / "bad.yaml"
  bad.write_text("optim:\n  learning_rate: 1e-3\n")
  with pytest.raises(JaxftError, match="unknown config key 'optim.learning_rate'; did you mean"):
    load_config(str(bad))
  bad.write_text("train:\n  epochs: [1, 2]\n")
  with pytest.raises(JaxftError, match="'train.epochs' expects float"):
    load_config(str(bad))
  bad.write_text("optim:\n  lr: 1e-3\ntrain:\n  epochs: 1\noptim:\n  name: sgd\n")  # PyYAML keeps the second
  with pytest.raises(JaxftError, match=r"^config file .*bad.yaml: key 'optim' is given twice in one mapping \(lines 1 "
                                       r"and 5\); YAML would keep the second only: merge them$"):
    load_config(str(bad))
  bad.write_text("optim:\n\tlr: 1\n")
  with pytest.raises(JaxftError, match=r"^config file .*bad.yaml:2:1: not valid YAML: a tab: YAML indents with spaces"):
    load_config(str(bad))
  bad.write_text("optim:\n  lr: [1\n")
  with pytest.raises(JaxftError, match=r"^config file .*bad.yaml:3:1: not valid YAML: expected ',' or ']'"):
    load_config(str(bad))
  with pytest.raises(JaxftError, match=r"^config file not found: optim.lr \(an override is key=value: optim.lr=...\)$"):
    load_config("optim.lr")


def test_numbers_read_alike_everywhere(tmp_path):
  """1e-4 is a float wherever it stands (YAML 1.1 reads it as a string), nested values included."""
  path = tmp_path / "c.yaml"
  path.write_text("optim:\n  lr: 1e-4\n  groups: [{match: 'embeddings/.*', lr_mult: 1e-1}]\n")
  for cfg in (load_config(str(path)), load_config(None, ("optim.lr=1e-4", "optim.groups=[{match: 'embeddings/.*', "
                                                           "lr_mult: 1e-1}]"))):
    assert cfg.optim.lr == 1e-4 and cfg.optim.groups == [{"match": "embeddings/.*", "lr_mult": 0.1}]
  import yaml
  assert yaml.safe_load("1e-4") == "1e-4"  # PyYAML's own loader is left as it was


def test_every_config_in_configs_dir_loads():
  for path in (ROOT / "configs").glob("*.yaml"):
    assert dataclasses.is_dataclass(load_config(str(path)))


@pytest.mark.parametrize("overrides,message", [
    (("model.task=sft",), "config key 'model.task' is now 'task.name'"),
    (("data.text_column=review",), "config key 'data.text_column' is now 'task.text_column'"),
    (("train.label_smoothing=0.1",), "config key 'train.label_smoothing' is now 'task.label_smoothing'"),
    (("task.stride=8",), "config key 'task.stride' is not a key of task.name=sequence_classification; it is a key "
                         "of question_answering (set task.name to it)"),
    (("task.stride=8", "task.name=image_classification"), "'task.stride' is not a key of task.name=image_classification"),
    (("task.poolin=mean",), "unknown config key 'task.poolin'; did you mean 'task.pooling'?"),
    (("task.name=question_answering", "task.max_answer_length=0"), "'task.max_answer_length' must be >= 1, got 0"),
    (("generate.top_p=0.9",), "config key 'generate.top_p' is now 'task.top_p'"),
    (("task.name=causal_lm", "task.eval_examples=4"), "'task.eval_examples' is not a key of task.name=causal_lm; "
                                                       "it is a key of sft"),
    (("task.name=sft", "task.top_p=0"), "'task.top_p' in (0, 1]; got 32, 0.0, 0.0"),
])
def test_task_keys_are_the_tasks_own(overrides, message):
  with pytest.raises(JaxftError) as e:
    load_config(None, overrides)
  assert message in str(e.value)


def test_task_section_follows_task_name_in_any_order(tmp_path):
  """task.name picks the section's keys, wherever it stands; keys both tasks share carry over."""
  cfg = load_config(None, ("task.stride=8", "task.name=question_answering"))
  assert (cfg.task.name, cfg.task.stride, cfg.task.max_answer_length) == ("question_answering", 8, 30)
  path = tmp_path / "c.yaml"
  path.write_text("task: {label_names: [a, b], name: token_classification}\n")
  cfg = load_config(str(path))
  assert (cfg.task.name, cfg.task.label_names, cfg.task.tags_column) == ("token_classification", ["a", "b"], "tags")
  again = tmp_path / "again.yaml"
  again.write_text(dump(cfg))  # a run dir's config.yaml loads back as it was
  assert load_config(str(again)) == cfg
  with pytest.raises(JaxftError, match="'task.label_names' is set, but task.name=question_answering has no such key"):
    load_config(str(path), ("task.name=question_answering",))
