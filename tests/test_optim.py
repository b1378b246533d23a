"""Optimizers by name, LR scaling, and gradient accumulation equivalence."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import optim, rules
from jaxft.config import load_config
from jaxft.data import batching
from jaxft.experiment import build
from jaxft.models.bert import CONVENTIONS as CONV
from jaxft.step import make_train_step

LR = {"adamw": 3e-3, "adam": 3e-3, "lamb": 3e-2, "adafactor": 3e-2, "lion": 3e-4, "sgd": 0.1, "lars": 0.3}


def losses(exp, batches, micro_steps=1):
  step = jax.jit(make_train_step(exp.apply, exp.task.loss, exp.tx, exp.labels, dropout=False, micro_steps=micro_steps))
  state, out = exp.initial_state(), []
  for b in batches:
    state, m = step(state, b)
    out.append(float(m["loss"]))
  return out, state


@pytest.mark.parametrize("name", sorted(LR))
def test_each_optimizer_reduces_loss(tiny_cfg, name):
  exp = build(tiny_cfg(f"optim.name={name}", f"optim.lr={LR[name]}", "optim.warmup_ratio=0",
                       "optim.schedule=constant"), print)
  batch = batching.bucketed(exp.splits["train"], exp.task.collate, 16, 1, 0, [32])[0]
  out, _ = losses(exp, [batch] * 8)
  assert np.all(np.isfinite(out)) and min(out) < 0.95 * out[0] and out[-1] < 0.97 * out[0], (name, out)


def test_lr_scaling_rules():
  cfg = load_config(None, ("optim.lr=1e-3", "optim.base_batch_size=256"))
  for rule, expected in (("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)):
    cfg.optim.scale_lr = rule
    assert optim.scaled_lr(cfg.optim, 1024) == pytest.approx(expected)


def test_accumulation_4x8_equals_batch_32(tiny_cfg):
  exp = build(tiny_cfg("train.batch_size=32"), print)
  batches = [batching.bucketed(exp.splits["train"], exp.task.collate, 32, 3, 0, [32])[i] for i in range(3)]
  full, s_full = losses(exp, batches)
  accum, s_accum = losses(build(tiny_cfg("train.batch_size=32", "train.micro_batch_size=8"), print),
                          batches, micro_steps=4)
  np.testing.assert_allclose(accum, full, rtol=1e-5)
  for path, x in rules.flat(jax.device_get(s_full.params)).items():
    np.testing.assert_allclose(rules.flat(jax.device_get(s_accum.params))[path], x, rtol=1e-4, atol=1e-6,
                               err_msg=path)


def test_micro_batch_must_divide_batch():
  from jaxft.errors import JaxftError
  with pytest.raises(JaxftError, match=r"'train.micro_batch_size' \(12\) must divide train.batch_size \(32\)"):
    load_config(None, ("train.micro_batch_size=12",))


def six_layer_tree():
  import jax.numpy as jnp
  leaf = jnp.ones((2, 2))
  layer = {"attention": {"self": {"query": {"kernel": leaf, "bias": leaf[0]}}}}
  return {"bert": {"embeddings": {"word_embeddings": {"embedding": leaf}},
                   "encoder": {"layer": {str(i): layer for i in range(6)}}},
          "classifier": {"kernel": leaf, "bias": leaf[0]}}


def test_layer_decay_multipliers_for_six_layers():
  cfg = load_config(None, ("optim.layer_decay=0.75", "optim.groups=[{match: classifier/kernel, lr_mult: 10}]"))
  mult = rules.flat(optim.lr_multipliers(cfg.optim, six_layer_tree(), CONV))
  assert mult["bert/embeddings/word_embeddings/embedding"] == pytest.approx(0.75 ** 7)
  for i in range(6):
    assert mult[f"bert/encoder/layer/{i}/attention/self/query/kernel"] == pytest.approx(0.75 ** (6 - i))
  assert mult["classifier/bias"] == 1.0 and mult["classifier/kernel"] == 10.0


def test_groups_scale_each_leafs_update():
  """Plain SGD at lr 1: every leaf moves by -multiplier * grad, and weight decay follows its group."""
  import jax.numpy as jnp
  cfg = load_config(None, ("optim.name=sgd", "optim.lr=1", "optim.momentum=0", "optim.clip_norm=0",
                           "optim.schedule=constant", "optim.warmup_ratio=0", "optim.layer_decay=0.5",
                           "optim.weight_decay=0.1", "optim.groups=[{match: 'bert/embeddings/.*', weight_decay: 0}]"))
  params = six_layer_tree()
  freeze = rules.apply_rules(params, [(r"bert/encoder/layer/0/.*", "frozen")], default="train")
  tx, _ = optim.make_optimizer(cfg.optim, params, freeze, 10, 32, CONV)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  up, mult = rules.flat(updates), rules.flat(optim.lr_multipliers(cfg.optim, params, CONV))
  wd = rules.flat(optim.weight_decays(cfg.optim, params, CONV))
  assert wd["bert/embeddings/word_embeddings/embedding"] == 0 and wd["classifier/bias"] == 0
  assert wd["classifier/kernel"] == 0.1
  for p, u in up.items():
    expected = 0.0 if p.startswith("bert/encoder/layer/0/") else -mult[p] * (1 + wd[p])
    np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=p)


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor", "lion", "sgd"])
def test_every_optimizer_updates_as_its_reference_with_the_config_s_values(name):
  """Each optim.name, its config keys set away from their defaults, updates as the reference written out by
  hand (optax's own optimizer with those values; SGD by its formula): no key is dropped or swapped."""
  import jax.numpy as jnp
  import optax
  cfg = load_config(None, (f"optim.name={name}", "optim.b1=0.8", "optim.b2=0.95", "optim.eps=1e-6",
                           "optim.momentum=0.5"))
  params = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3) / 7 + 0.1, "bias": jnp.ones(3)}, "b": jnp.linspace(-1, 1, 4)}
  ours = optim.base_optimizer(cfg.optim, 1e-2, 0.05, None)
  theirs = {"adamw": lambda: optax.adamw(1e-2, 0.8, 0.95, 1e-6, weight_decay=0.05),
            "adam": lambda: optax.adam(1e-2, 0.8, 0.95, 1e-6),
            "adafactor": lambda: optax.adafactor(1e-2, weight_decay_rate=0.05),
            "lion": lambda: optax.lion(1e-2, 0.8, 0.95, weight_decay=0.05)}.get(name)
  s1 = ours.init(params)
  s2 = theirs().init(params) if theirs else None
  velocity = jax.tree.map(jnp.zeros_like, params)
  for step in range(3):
    grads = jax.tree.map(lambda x: jnp.cos(3 * x + step) + 0.1, params)  # noqa: B023
    u1, s1 = ours.update(grads, s1, params)
    if theirs:
      u2, s2 = theirs().update(grads, s2, params)
    else:  # SGD: v <- momentum v + (g + wd p); update -lr v
      velocity = jax.tree.map(lambda v, g, p: 0.5 * v + g + 0.05 * p, velocity, grads, params)
      u2 = jax.tree.map(lambda v: -1e-2 * v, velocity)
    for p, x in rules.flat(u2).items():
      np.testing.assert_allclose(rules.flat(u1)[p], x, rtol=1e-6, atol=1e-9, err_msg=f"{name} step {step} {p}")
    assert any(np.abs(x).max() > 1e-4 for x in rules.flat(u1).values())
    params = optax.apply_updates(params, u1)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_lamb_and_lars_are_optax_s_and_log_trust_ratios_per_layer(tiny_cfg, name):
  """jaxft's LAMB / LARS (optax's, with the trust ratio kept in the state) update as optax.lamb / optax.lars
  do; the train step logs their mean trust ratio per layer group."""
  import jax.numpy as jnp
  import optax
  cfg = load_config(None, (f"optim.name={name}", "optim.weight_decay=0.01"))
  params = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3) / 7, "bias": jnp.ones(3)}, "b": jnp.linspace(-1, 1, 4)}
  grads = jax.tree.map(lambda x: jnp.cos(3 * x) + 0.1, params)
  mask = {"a": {"kernel": True, "bias": False}, "b": True}
  ours = optim.base_optimizer(cfg.optim, 1e-2, 0.01, mask)
  theirs = (optax.lamb(1e-2, cfg.optim.b1, cfg.optim.b2, cfg.optim.eps, weight_decay=0.01) if name == "lamb" else
            optax.lars(1e-2, weight_decay=0.01, trust_ratio_mask=mask, momentum=cfg.optim.momentum))
  s1, s2 = ours.init(params), theirs.init(params)
  for _ in range(3):
    u1, s1 = ours.update(grads, s1, params)
    u2, s2 = theirs.update(grads, s2, params)
    for p, x in rules.flat(u2).items():
      np.testing.assert_allclose(rules.flat(u1)[p], x, rtol=1e-6, err_msg=p)
  exp = build(tiny_cfg(f"optim.name={name}", f"optim.lr={LR[name]}"), print)
  batch = batching.bucketed(exp.splits["train"], exp.task.collate, 16, 1, 0, [32])[0]
  _, m = jax.jit(exp.train_step(0))(exp.initial_state(), batch)
  ratios = {k: float(v) for k, v in m.items() if k.startswith("trust_ratio/")}
  n = rules.num_layers(exp.initial_state().params, exp.conventions)
  assert set(ratios) == {f"trust_ratio/layer_{i}" for i in range(n)} | {"trust_ratio/other", "trust_ratio/embeddings"}
  assert all(np.isfinite(r) and r > 0 for r in ratios.values()) and len(set(ratios.values())) > 1, ratios


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_equals_optax_bit_for_bit(kind):
  """optim.schedule is written in jnp (a swept replica's peak and warmup are traced values): it gives what optax's
  warmup + linear / cosine / constant schedules give, exactly."""
  import optax
  for warmup_ratio, total in ((0.0, 7), (0.06, 100), (0.3, 1234)):
    ocfg = types.SimpleNamespace(warmup_ratio=warmup_ratio, schedule=kind)
    warmup = int(round(warmup_ratio * total))
    after = {"linear": optax.linear_schedule(3e-5, 0.0, total - warmup), "constant": optax.constant_schedule(3e-5),
             "cosine": optax.cosine_decay_schedule(3e-5, total - warmup)}[kind]
    want = after if not warmup else optax.join_schedules([optax.linear_schedule(0.0, 3e-5, warmup), after], [warmup])
    counts = jnp.arange(total + 3)
    np.testing.assert_array_equal(jax.vmap(optim.schedule(ocfg, total, 3e-5))(counts), jax.vmap(want)(counts))
