"""Frozen params stay bitwise unchanged, hold no optimizer state, and cost no backward compute."""
import jax
import numpy as np
import optax

from jaxft import rules
from jaxft.data import batching
from jaxft.experiment import build


def run_steps(exp, n):
  step = jax.jit(exp.train_step(), donate_argnums=0)
  source = batching.bucketed(exp.splits["train"], exp.task.collate, exp.cfg.train.batch_size, n, 0, exp.buckets)
  state = exp.initial_state()
  before = jax.device_get(state.params)
  for i in range(n):
    state, _ = step(state, source[i])
  return before, jax.device_get(state.params), state


def test_frozen_unchanged_trainable_move_no_state(tiny_cfg):
  exp = build(tiny_cfg("freeze_embeddings=true", "freeze_bottom_layers=2", "freeze=[bert/encoder/layer/3/output/.*]"), print)
  before, after, state = run_steps(exp, 3)
  labels = rules.flat(exp.labels)
  frozen = [p for p, l in labels.items() if l == "frozen"]
  assert any("embeddings" in p for p in frozen) and any("layer/1/" in p for p in frozen)
  for p in labels:
    same = np.array_equal(rules.flat(before)[p], rules.flat(after)[p])
    assert same == (labels[p] == "frozen"), p
  # The optimizer state holds Adam moments for trainable leaves only.
  moment_paths = set()
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    keys = [str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey)]
    if leaf.ndim > 0:
      moment_paths.add("/".join(keys[1:]))
  assert moment_paths == {p for p, l in labels.items() if l == "train"}
  assert isinstance(state.opt_state[-1].inner_states["frozen"], optax.MaskedState)


def test_frozen_step_compiles_to_fewer_flops(tiny_cfg):
  """Guards the speed of freezing: frozen gradients must not be computed."""
  def flops(*overrides):
    exp = build(tiny_cfg(*overrides), print)
    batch = batching.bucketed(exp.splits["train"], exp.task.collate, 16, 1, 0, [32])[0]
    step = jax.jit(exp.train_step())
    return step.lower(exp.initial_state(), batch).compile().cost_analysis()["flops"]
  full, bottom, head = flops(), flops("freeze_embeddings=true", "freeze_bottom_layers=3"), \
      flops("train_only=[classifier/.*]")
  assert head < 0.5 * full and bottom < 0.75 * full, (full, bottom, head)


def test_unmatched_freeze_rule_is_an_error(tiny_cfg):
  import pytest

  from jaxft.errors import JaxftError
  with pytest.raises(JaxftError, match="freeze rule 'bert/encoder/layers/.*' matches no parameter path"):
    build(tiny_cfg("freeze=[bert/encoder/layers/.*]"), print)
