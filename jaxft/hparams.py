"""train.sweep's keys that act outside the optimizer (`SWEEPABLE`): each replica's value lives in its model state
(`model_state["swept"]`, so the train and eval steps, generation and export each see their replica's own) and
is read where the config's value would be, through `value` inside `scope`. The optimizer's keys live in its
own state instead (optim.swept). A run that sweeps none of these has no such entry: its programs are unchanged.
"""
import contextlib

import jax.numpy as jnp

KEY = "swept"  # model_state[KEY]: {config key: f32 scalar}
SWEEPABLE = ("task.label_smoothing", "lora.alpha", "lora.dropout")
_scopes = []  # the values in force while a step is traced: a stack of {config key: value}


def of(setting: dict) -> dict:
  """The keys of a train.sweep setting that this module holds."""
  return {k: v for k, v in setting.items() if k in SWEEPABLE}


def held(cfg, setting: dict) -> dict:
  """The model-state entry of a replica with `setting` ({} where the sweep varies none of SWEEPABLE): every swept
  key's value, the config's where the setting lacks it."""
  keys = [k for k in (cfg.train.sweep or {}) if k in SWEEPABLE]
  if not keys:
    return {}
  config = lambda key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])  # noqa: E731
  return {KEY: {k: jnp.asarray(setting.get(k, config(k)), jnp.float32) for k in keys}}


def split(model_state):
  """(the model state without the swept values, the swept values or {})."""
  if not model_state or KEY not in model_state:
    return model_state, {}
  return {k: v for k, v in model_state.items() if k != KEY}, model_state[KEY]


@contextlib.contextmanager
def scope(model_state):
  """Within the block, `value` reads the swept values of `model_state` (a replica's, traced or not)."""
  _scopes.append(split(model_state)[1])
  try:
    yield
  finally:
    _scopes.pop()


def value(key: str, default):
  """A replica's value of `key` where the sweep varies it (in `scope`), else `default` (the config's)."""
  return _scopes[-1].get(key, default) if _scopes else default


def swept(key: str) -> bool:
  """Whether `key` is a traced value in the current scope (code that skips work at 0 cannot tell then)."""
  return bool(_scopes) and key in _scopes[-1]
