"""Seed-vectorised runs (replicas.py): replica k of an N-seed step equals the single run with seed k; shared
(never trained) params are held once; batches of unequal shapes stack with weight-0 padding."""
import jax
import numpy as np
import pytest

from jaxft import replicas, rules
from jaxft.errors import JaxftError
from jaxft.experiment import build

QUIET = dict(log=lambda *_: None)


def single_losses(cfg, steps):
  exp = build(cfg, **QUIET)
  step, batches, state, out = jax.jit(exp.train_step(0)), exp.train_batches(), exp.state, []
  for i in range(steps):
    state, m = step(state, batches[i])
    out.append(float(m["loss"]))
  return out


@pytest.mark.parametrize("pack", [True, False])
def test_replica_k_equals_the_single_run_with_seed_k(tiny_cfg, pack):
  """20 steps, dropout on: packed rows (their counts differ between replicas) or length buckets."""
  seeds, steps = [0, 3], 20
  extra = (f"data.pack={str(pack).lower()}", "train.epochs=3", "freeze_embeddings=true")
  exp = build(tiny_cfg(*extra, f"train.seeds={seeds}"), **QUIET)
  own = replicas.owned(exp.phases)
  state = replicas.initial_state(exp, seeds)
  step = jax.jit(replicas.vectorize_train(exp.train_step(0), replicas.axes(state, own)))
  feed = replicas.Batches([exp.train_batches(seed=s) for s in seeds])
  losses = []
  for i in range(steps):
    state, m = step(state, feed[i])
    losses.append(np.asarray(m["loss"]))
  losses = np.stack(losses)  # [steps, R]
  for k, s in enumerate(seeds):
    np.testing.assert_allclose(losses[:, k], single_losses(tiny_cfg(*extra, f"seed={s}"), steps), atol=1e-5,
                               err_msg=f"replica {k} (seed {s})")
  assert np.abs(losses[:, 0] - losses[:, 1]).max() > 1e-3  # the replicas are different runs
  # frozen leaves (the word embeddings) are one copy; trained ones one per replica
  single = rules.flat(exp.state.params)
  for p, x in rules.flat(state.params).items():
    assert x.shape == ((len(seeds),) + single[p].shape if p in own else single[p].shape), p
  assert any(p not in own for p in single)


def test_stacked_batches_pad_with_no_weight():
  a = {"input_ids": np.ones((2, 3), np.int32), "weights": np.ones((2,), np.float32), "index": np.arange(2)}
  b = {"input_ids": np.ones((4, 5), np.int32), "weights": np.ones((4,), np.float32), "index": np.arange(4)}
  s = replicas.stack_batches([a, b])
  assert s["input_ids"].shape == (2, 4, 5) and s["input_ids"][0, 2:].sum() == 0 and s["input_ids"][0, :2, 3:].sum() == 0
  assert s["weights"][0].tolist() == [1, 1, 0, 0] and s["index"][0].tolist() == [0, 1, -1, -1]


def test_seeds_config():
  from jaxft.config import load_config
  assert replicas.seeds_of(load_config(None, ("train.seeds=3", "seed=5"))) == [5, 6, 7]
  assert replicas.seeds_of(load_config(None, ("train.seeds=[0, 3, 7]",))) == [0, 3, 7]
  assert replicas.seeds_of(load_config(None, ())) == []
  for bad, msg in (("train.seeds=0", "count >= 1"), ("train.seeds=[1, 1]", "distinct"),
                   ("model.weights=random", "pretrained weights")):
    with pytest.raises(JaxftError, match=msg):
      load_config(None, ("train.seeds=2", bad) if bad.startswith("model") else (bad,))


def test_summary_is_the_t_interval():
  mean, half = replicas.summary([1.0, 2.0, 3.0])
  assert mean == 2.0 and abs(half - 4.302653 * 1.0 / np.sqrt(3)) < 1e-5


def test_train_refuses_seeds_until_the_loop_runs_replicas(tiny_cfg):
  from jaxft.train import train
  with pytest.raises(JaxftError, match="train.seeds"):
    train(tiny_cfg("train.seeds=2"))
