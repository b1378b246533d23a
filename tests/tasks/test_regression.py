"""task.name=regression on the tiny BERT: it learns real-valued targets (two at once), packed and unpacked
evaluation agree, its metrics are scipy's and numpy's over the split, and bad targets are one-line errors."""
import json
import types

import numpy as np
import pytest
from conftest import NEGATIVE, POSITIVE, WORDS, jaxft, jaxft_calls, tiny_overrides
from scipy import stats

from jaxft.config import load_config
from jaxft.errors import JaxftError
from jaxft.evaluate import evaluate
from jaxft.experiment import build, setup
from jaxft.tasks.base import Examples
from jaxft.tasks.regression import Regression


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
  """Texts whose targets are the share of positive minus negative words (x 3, + 10: standardising matters),
  and the share of positive words."""
  root, rng = tmp_path_factory.mktemp("scores"), np.random.default_rng(0)
  for split, n in (("train", 320), ("validation", 64), ("test", 64)):
    rows = []
    for _ in range(n):
      pos, neg, other = rng.integers(0, 4), rng.integers(0, 4), rng.integers(1, 4)
      words = list(rng.choice(POSITIVE, pos)) + list(rng.choice(NEGATIVE, neg)) + list(rng.choice(WORDS[10:], other))
      rng.shuffle(words)
      n_words = len(words)
      rows.append({"text": " ".join(words), "score": 10 + 3 * (pos - neg) / n_words, "positive": pos / n_words})
    (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return root


def overrides(tiny_bert, scores, run_dir, *extra):
  return (*tiny_overrides(tiny_bert, scores, run_dir), "task.name=regression", "task.targets=[score, positive]",
          "train.epochs=6", *extra)


def test_learns_two_targets(tiny_bert, scores, tmp_path):
  run = jaxft("train", *overrides(tiny_bert, scores, tmp_path / "run"))
  assert run.returncode == 0, run.stderr[-2000:]
  words = run.stdout.split()  # "test loss X  mse X  pearson X  spearman X"
  test = {k: float(words[words.index(k) + 1]) for k in ("loss", "mse", "pearson", "spearman")}
  assert test["pearson"] > 0.85 and test["spearman"] > 0.8 and test["mse"] < 1.0, test
  # The run's targets are stored with it: listed in another order, they are read in the run's (their means and
  # deviations too); a target it was not trained on is refused.
  swapped, dropped = jaxft_calls([("eval", *overrides(tiny_bert, scores, tmp_path / "run", f"task.targets={t}"))
                                  for t in ("[positive, score]", "[score]")])
  assert swapped.returncode == 0 and swapped.stdout.split()[1:] == words[1:], swapped.stderr[-2000:]
  assert dropped.returncode == 2 and dropped.stderr.strip().splitlines()[-1].endswith(
    "config key 'task.targets' is ['score']; the run in " f"{tmp_path / 'run'} (checkpoint 120) was trained on "
    "['score', 'positive']"), dropped.stderr[-2000:]


def test_packed_and_padded_evaluation_agree(tiny_bert, scores, tmp_path):
  out = {}
  for pack in ("true", "false"):
    exp = build(load_config(None, overrides(tiny_bert, scores, tmp_path / pack, f"data.pack={pack}")),
                log=lambda *a: None)
    par, targets = setup(exp, lambda *a: None)
    state = par.put_state(exp.initial_state(), targets[0])
    out[pack] = evaluate(exp, par, par.compile_eval(exp.eval_step(), targets[0]), state.params, state.model_state,
                         "test")
  assert out["true"].keys() == out["false"].keys() == {"loss", "mse", "pearson", "spearman"}
  for k in out["true"]:
    assert out["true"][k] == pytest.approx(out["false"][k], rel=1e-4, abs=1e-5), k


def test_metrics_are_scipys_over_the_split():
  rng = np.random.default_rng(1)
  gold, pred = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
  task = types.SimpleNamespace(mean=np.array([10.0, 0.5]), std=np.array([3.0, 0.2]))
  rows = {"pred": list(pred)}
  sq = float(np.sum(np.mean((pred - gold) ** 2, -1)))
  m = Regression.finalize(task, {"sq_sum": sq, "count": 50.0}, rows, Examples(np.ones(50), {"targets": gold}))
  units = lambda x: x * task.std + task.mean  # noqa: E731
  assert m["loss"] == pytest.approx(sq / 50)
  assert m["mse"] == pytest.approx(np.mean((units(pred) - units(gold)) ** 2))
  assert m["pearson"] == pytest.approx(np.mean([stats.pearsonr(pred[:, t], gold[:, t])[0] for t in (0, 1)]))
  assert m["spearman"] == pytest.approx(np.mean([stats.spearmanr(pred[:, t], gold[:, t])[0] for t in (0, 1)]))


@pytest.mark.parametrize("row,targets,message", [
    ({"text": "a", "score": 1.0}, "[score]", "'score' is constant in the training data"),
    ({"text": "a", "score": "high"}, "[score]", r"t.jsonl:1: 'score' is a string \(high\), expected an integer or a number"),
    ({"text": "a", "score": 1.0}, "[rating]", "the training data has no column 'rating'"),
    ({"text": "a", "score": 1.0}, "[score, score]", "'task.targets' must name one column or more, each once"),
])
def test_bad_targets(tiny_bert, tmp_path, row, targets, message):
  (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
  cfg = (f"model.name={tiny_bert['pt']}", "data.name=files", f"data.train={tmp_path / 't.jsonl'}",
         f"data.validation={tmp_path / 't.jsonl'}", f"data.test={tmp_path / 't.jsonl'}", "task.name=regression",
         f"task.targets={targets}")
  with pytest.raises(JaxftError, match=message):
    build(load_config(None, cfg), log=lambda *a: None)
