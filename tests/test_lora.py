"""LoRA: only adapters (and the head) train, adapters follow their kernel's sharding, and the merged
export reproduces the adapted model's logits."""
import jax
import numpy as np
import pytest

from jaxft import lora, parallel, rules
from jaxft.cli import main
from jaxft.data import batching
from jaxft.errors import JaxftError
from jaxft.experiment import build
from jaxft.step import make_train_step

LORA = ("lora.targets=[.*/attention/self/(query|value)/kernel]", "lora.rank=4", "lora.alpha=8")


def test_only_adapters_and_head_train(tiny_cfg):
  exp = build(tiny_cfg(*LORA, "lora.dropout=0.1"), print)
  labels = rules.flat(exp.labels)
  trainable = {p for p, l in labels.items() if l == "train"}
  assert trainable == {p for p in labels if "/lora_" in p} | {"classifier/kernel", "classifier/bias"}
  assert len([p for p in trainable if "/lora_" in p]) == 2 * 2 * 4  # (a, b) x (query, value) x 4 layers
  flat = rules.flat(jax.device_get(exp.initial_state().params))
  assert flat["bert/encoder/layer/0/attention/self/query/lora_a"].shape == (32, 4)
  assert flat["bert/encoder/layer/0/attention/self/query/lora_b"].shape == (4, 32)

  step = jax.jit(make_train_step(exp.apply, exp.task.loss, exp.tx, exp.labels), donate_argnums=0)
  batches = batching.bucketed(exp.splits["train"], exp.task.collate, 16, 3, 0, [32])
  state = exp.initial_state()
  for i in range(3):
    state, m = step(state, batches[i])
  after = rules.flat(jax.device_get(state.params))
  for p in labels:
    assert np.array_equal(flat[p], after[p]) == (p not in trainable), p
  # optimizer moments exist for the adapters and the head only
  moment = {p for k, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            if x.ndim and (p := rules.owner(k, labels))}
  assert moment == trainable


def test_merge_reproduces_adapted_logits(tiny_cfg):
  exp = build(tiny_cfg(*LORA), print)
  # random (non-zero) lora_b, so the adapters change the output
  params = jax.tree_util.tree_map_with_path(
      lambda k, x: 0.1 * jax.random.normal(jax.random.PRNGKey(len(k)), x.shape) if "lora_b" in str(k) else x,
      exp.initial_state().params)
  batch = next(iter(batching.eval_batches(exp.splits["test"], exp.task.collate, 32, [32])))
  adapted = exp.apply(params, batch, True)[0]  # training's path: the interceptor (no rng: no dropout)
  np.testing.assert_allclose(exp.apply(params, batch)[0], adapted, atol=1e-5)  # evaluation's: merged
  base = rules.merge({p: x for p, x in rules.flat(params).items() if "/lora_" not in p})
  base_logits = build(tiny_cfg(), print).apply(base, batch)[0]
  merged = build(tiny_cfg(), print).apply(lora.merge(params, exp.cfg.lora), batch)[0]
  assert np.abs(adapted - base_logits).max() > 1e-3  # the adapters matter ...
  np.testing.assert_allclose(merged, adapted, atol=1e-5)  # ... and merging keeps them exactly


def test_adapters_follow_kernel_sharding(tiny_cfg):
  exp = build(tiny_cfg(*LORA), print)
  mesh = jax.make_mesh((1, 1, 1), parallel.AXES)
  specs = rules.flat(parallel.param_specs(exp.initial_state().params, [], exp.conventions.tensor_parallel, mesh))
  q = "bert/encoder/layer/0/attention/self/query"
  assert tuple(specs[f"{q}/kernel"]) == (None, "tensor")
  assert tuple(specs[f"{q}/lora_a"]) == (None, None) and tuple(specs[f"{q}/lora_b"]) == (None, "tensor")


def test_train_then_export_loads_back(tiny_cfg, tmp_path):
  cfg = tiny_cfg(*LORA, "train.epochs=2", "optim.lr=1e-2")
  from jaxft.config import dump
  (tmp_path / "cfg.yaml").write_text(dump(cfg))
  assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
  out = tmp_path / "exported"
  assert main(["export", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 0
  assert (out / "model.safetensors").is_file() and (out / "classifier.msgpack").is_file()
  assert main(["export", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 2  # never overwrites
  # the exported dir is a plain model: same logits as the trained adapted model
  trained = build(cfg, print)
  from jaxft.checkpoint import Checkpointer
  ckpt = Checkpointer(tmp_path / "run" / "checkpoints", 2)
  step = ckpt.record(ckpt.latest_step()).best_step
  state = ckpt.restore(step, trained.initial_state())[0]
  ckpt.close()
  reloaded = build(tiny_cfg(f"model.name={out}"), print)
  batch = next(iter(batching.eval_batches(trained.splits["test"], trained.task.collate, 32, [32])))
  np.testing.assert_allclose(reloaded.apply(reloaded.initial_state().params, batch)[0],
                             trained.apply(state.params, batch)[0], atol=1e-5)


def test_bad_target_is_an_error(tiny_cfg):
  with pytest.raises(JaxftError, match="lora target 'nope/.*' matches no parameter path"):
    build(tiny_cfg("lora.targets=[nope/.*]"), print)
  with pytest.raises(JaxftError, match="is not a 2-D Dense kernel"):
    build(tiny_cfg("lora.targets=[.*/query/bias]"), print)
