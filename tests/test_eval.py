"""`jaxft eval`: a checkpoint's metrics equal what training reported; with no checkpoints, the model as loaded."""
import json

from jaxft.cli import main
from jaxft.config import dump
from jaxft.train import train


def eval_json(cfg_path, capsys, *args):
  assert main(["eval", str(cfg_path), "--json", *args]) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_best_checkpoint_equals_the_runs_test_metrics(tiny_cfg, tmp_path, capsys):
  cfg = tiny_cfg("train.epochs=1", "train.eval_every=8", "train.checkpoint_every=8", "train.keep=5")
  (tmp_path / "cfg.yaml").write_text(dump(cfg))
  test = train(cfg)
  capsys.readouterr()
  out = eval_json(tmp_path / "cfg.yaml", capsys)
  assert out["split"] == "test" and out["accuracy"] == test["accuracy"] and out["loss"] == test["loss"]
  step8 = eval_json(tmp_path / "cfg.yaml", capsys, "--step", "8", "--split", "validation")
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  at8 = next(r for r in rows if r["split"] == "validation" and r["step"] == 8)
  assert step8["accuracy"] == at8["accuracy"]
  assert main(["eval", str(tmp_path / "cfg.yaml"), "--step", "7"]) == 2  # no such checkpoint


def test_eval_without_checkpoints_is_the_loaded_model(tiny_cfg, tmp_path, capsys):
  (tmp_path / "cfg.yaml").write_text(dump(tiny_cfg()))
  out = eval_json(tmp_path / "cfg.yaml", capsys, "--split", "validation")
  assert 0.2 < out["accuracy"] < 0.8  # an untrained head on a balanced binary task: near chance
  assert not (tmp_path / "run" / "checkpoints").exists()  # eval writes nothing
