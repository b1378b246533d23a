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
                           "data.label_names=[neg, pos]", "data.validation=null"))
  assert cfg.optim.lr == 3e-5 and isinstance(cfg.optim.lr, float)
  assert cfg.train.epochs == 1.0 and cfg.freeze == ["a.*", "b.*"] and cfg.freeze_embeddings is True
  assert cfg.data.label_names == ["neg", "pos"] and cfg.data.validation is None


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("lr=1", "unknown config key 'lr'; did you mean 'optim.lr'?"),
    ("train.batch_size=abc", "config key 'train.batch_size' expects int, got 'abc'"),
    ("freeze_embeddings=maybe", "config key 'freeze_embeddings' expects bool, got 'maybe'"),
    ("freeze=3", "config key 'freeze' expects a list of str, got 3"),
    ("optim.schedule=exp", "config key 'optim.schedule' must be linear, cosine or constant"),
    ("train.epochs", "override 'train.epochs' is not of the form key=value"),
    ("optim.groups=[{match: x, lr: 2}]", "config key 'optim.groups[0]' must be {match: regex, lr_mult: number"),
    ("optim.layer_decay=1.5", "config key 'optim.layer_decay' must be in (0, 1], got 1.5"),
    ("precision.compute=fp8", "config key 'precision.compute' must be float32 or bfloat16, got 'fp8'"),
    ("lora.rank=0", "config keys 'lora.rank' and 'lora.alpha' must be > 0"),
    ("phases_preset=lpft", "config key 'phases_preset' must be lp_ft or gradual_unfreeze, got 'lpft'"),
    ("phases=[{until: {metric: loss}}]", "config key 'phases[0].until' must be {metric: val_<metric>"),
    ("model.task=ner", "config key 'model.task' must be one of sequence_classification"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(JaxftError) as e:
    load_config(None, (override,))
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


def test_every_config_in_configs_dir_loads():
  for path in (ROOT / "configs").glob("*.yaml"):
    assert dataclasses.is_dataclass(load_config(str(path)))
