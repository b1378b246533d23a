"""train.batch_schedule: the batch doubles (more micro-batches) while the gradient noise scale exceeds it; the
step counter, schedules and logs count batches of train.batch_size, and a stopped run resumes exactly."""
import math

import numpy as np
import pytest
from conftest import metric_rows as rows
from conftest import stopped_then_resumed

from jaxft import batch_schedule
from jaxft.config import load_config
from jaxft.errors import JaxftError

RUN = ("train.epochs=3", "train.micro_batch_size=8", "train.eval_every=16", "train.checkpoint_every=8",
       "train.keep=1", "train.log_every=1", "freeze_embeddings=true", "optim.warmup_ratio=0.25")
GROW = "train.batch_schedule={max: 64, every: 8}"


def test_the_batch_doubles_while_the_noise_scale_exceeds_it():
  cfg = load_config(None, ("train.batch_size=16", "train.micro_batch_size=8", GROW))
  def noise(examples, batch=16, per_example=1.0):  # the step's metrics: B_simple and the batch in loss weights
    return {"noise_scale": examples * per_example, "batch_weight": batch * per_example}
  assert batch_schedule.grown(cfg, 1, 8, 0, noise(40)) == 2  # 40 examples >= the batch of 16
  assert batch_schedule.grown(cfg, 1, 8, 0, noise(10)) == 1
  assert batch_schedule.grown(cfg, 1, 7, 0, noise(40)) == 1  # fewer than `every` units since the last change
  assert batch_schedule.grown(cfg, 2, 16, 8, noise(24, 32, per_example=4.0)) == 2  # tokens: 24 examples < 32
  assert batch_schedule.grown(cfg, 2, 16, 8, noise(40, 32, per_example=4.0)) == 4
  assert batch_schedule.grown(cfg, 4, 40, 8, noise(1e6, 64)) == 4  # 4 x 16 = max: no further
  assert batch_schedule.grown(cfg, 1, 8, 0, {}) == 1  # no noise scale measured yet


def test_join_pads_to_one_shape_and_a_row_multiple():
  a = {"input_ids": np.ones((2, 4), np.int32), "index": np.array([0, 1])}
  b = {"input_ids": np.ones((3, 6), np.int32), "index": np.array([2, 3, 4])}
  out = batch_schedule.join([a, b], 4)
  assert out["input_ids"].shape == (8, 6) and out["input_ids"][:2, 4:].sum() == 0 and out["input_ids"][5:].sum() == 0
  assert out["index"].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
  assert batch_schedule.crossed(16, 4, 8) and not batch_schedule.crossed(15, 4, 8) and batch_schedule.crossed(9, 2, 8)


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_data, tmp_path_factory):
  """A fixed-batch run; the batch-scheduled run with its doubling forced at units 8 and 16 (the rule is the
  test above's); and that run stopped by SIGTERM after unit 20 and resumed."""
  from conftest import tiny_overrides

  from jaxft.train import train
  root = tmp_path_factory.mktemp("batch_schedule")
  cfg = lambda name, *extra: load_config(None, tiny_overrides(tiny_bert, tiny_data, root / name) + RUN + extra)  # noqa: E731
  train(cfg("fixed"))
  forced = lambda cfg, k, step, changed, m: 2 * k if step in (8, 16) else k  # noqa: E731
  original, batch_schedule.grown = batch_schedule.grown, forced
  try:
    train(cfg("grown", GROW))
    stopped_then_resumed(cfg("resumed", GROW), 20)
  finally:
    batch_schedule.grown = original
  return {n: root / n for n in ("fixed", "grown", "resumed")}


def test_a_grown_batch_counts_units_and_trains_as_scheduled(runs):
  fixed, grown = rows(runs["fixed"], "train"), rows(runs["grown"], "train")
  total = fixed[-1]["step"]
  assert grown[-1]["step"] == total  # the same examples, in fewer steps
  assert [r["step"] for r in grown][:10] == list(range(1, 9)) + [10, 12]
  np.testing.assert_allclose([r["loss"] for r in grown[:8]], [r["loss"] for r in fixed[:8]], atol=1e-6)
  assert [r["batch_size"] for r in grown if r["step"] in (8, 10, 16, 20)] == [16, 32, 32, 64]
  # the schedule runs over units: a step of u units ending at unit s trains with the LR of unit s - u + 1 (its
  # peak as scaled for the batch: optim.scale_lr none keeps it)
  lr_at = {r["step"]: r["lr"] for r in fixed}
  np.testing.assert_allclose([r["lr"] for r in grown], [lr_at[r["step"] - r["batch_size"] // 16 + 1] for r in grown],
                             rtol=1e-6)
  assert {r["batch_size"] for r in grown} == {16, 32, 64}
  assert all(math.isfinite(r["loss"]) for r in grown) and grown[-1]["loss"] < grown[0]["loss"]


def test_a_stopped_batch_scheduled_run_resumes_exactly(runs):
  for split in ("train", "validation", "test"):
    a, b = rows(runs["grown"], split), rows(runs["resumed"], split)
    assert [r["step"] for r in a] == [r["step"] for r in b], split
    np.testing.assert_array_equal([r["loss"] for r in a], [r["loss"] for r in b], err_msg=split)


@pytest.mark.parametrize("bad, msg", [
    (("train.batch_schedule={max: 64}",), r"needs train.micro_batch_size"),
    (("train.batch_schedule={max: 48}", "train.micro_batch_size=8"), r"times a power of 2"),
    (("train.batch_schedule={max: 64, when: 3}", "train.micro_batch_size=8"), r"must be \{max: the largest batch"),
    (("train.batch_schedule={max: 64}", "train.micro_batch_size=8", "train.seeds=2"), r"not supported yet"),
])
def test_a_bad_batch_schedule_is_a_one_line_error(bad, msg):
  with pytest.raises(JaxftError, match=msg):
    load_config(None, ("train.batch_size=16",) + bad)
