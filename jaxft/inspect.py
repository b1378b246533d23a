"""`jaxft inspect`: the param tree folded by subtree, with freeze status, counts, sharding and bytes."""
import jax
from jax.sharding import PartitionSpec as P
from rich.console import Console
from rich.table import Table

from jaxft import parallel, quantize, rules


def fold_key(path: str, depth: int | None) -> str:
  """Subtree a path is folded into: up to its layer index (…/layer/3), else its first 2 keys."""
  parts = path.split("/")[:-1] or path.split("/")
  if depth is None:
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    depth = numeric[0] + 1 if numeric else 2
  return "/".join(parts[:depth])


def leaf_stats(exp, mesh) -> tuple[dict, int]:
  """Per param path: size, label, spec, bytes and per-device bytes of the param and of its
  optimizer state; plus optimizer bytes tied to no param (step counters)."""
  state, mb = jax.eval_shape(exp.initial_state), lambda x: x.size * x.dtype.itemsize
  pspecs = parallel.param_specs(state.params, exp.cfg.sharding.rules, exp.conventions.tensor_parallel, mesh)
  specs, labels = rules.flat(pspecs), rules.flat(exp.labels)
  stats = {p: {"params": x.size, "label": labels[p], "spec": specs[p], "shape": x.shape, "bytes": mb(x),
               "device_bytes": mb(x) // parallel.shards(specs[p], mesh), "opt_bytes": 0, "opt_device_bytes": 0}
           for p, x in rules.flat(state.params).items()}
  opt_specs = jax.tree.leaves(parallel.state_specs(state, pspecs).opt_state, is_leaf=lambda x: isinstance(x, P))
  other = 0
  for (keypath, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(state.opt_state)[0], opt_specs):
    if (path := rules.owner(keypath, stats)) is None:
      other += mb(leaf)
    else:
      stats[path]["opt_bytes"] += mb(leaf)
      stats[path]["opt_device_bytes"] += mb(leaf) // parallel.shards(spec, mesh)
  return stats, other


def report(exp, mesh, depth: int | None = None, per_param: bool = False, console: Console | None = None):
  """Prints the folded table (and with per_param, one row per param); returns the folded rows."""
  console = console or Console()
  if console.width < 140 and not console.is_terminal:  # do not squeeze paths in logs and pipes
    console = Console(width=140)
  stats, opt_other = leaf_stats(exp, mesh)
  keys = ("params", "bytes", "opt_bytes", "device_bytes", "opt_device_bytes")
  rows: dict[str, dict] = {}
  for path, st in stats.items():
    row = rows.setdefault(fold_key(path, depth), {**{k: 0 for k in keys}, "labels": set()})
    row["labels"].add(st["label"])
    for k in keys:
      row[k] += st[k]

  status = lambda ls: "mixed" if len(ls) > 1 else ("trainable" if "train" in ls else "frozen")
  mib = lambda b: f"{b / 2**20:,.2f}"
  tot = {k: sum(r[k] for r in rows.values()) for k in keys}
  n_train = sum(st["params"] for st in stats.values() if st["label"] == "train")
  table = Table(title=f"{exp.backbone.name} + {exp.cfg.task.name} head", show_footer=True)
  for name, footer, right in (
      ("subtree", "total", False), ("params", f"{tot['params']:,}", True),
      ("status", f"{n_train:,} trainable", False), ("param MiB", mib(tot["bytes"]), True),
      ("opt-state MiB", mib(tot["opt_bytes"] + opt_other), True),
      ("per device MiB (param + opt)", mib(tot["device_bytes"] + tot["opt_device_bytes"] + opt_other), True)):
    table.add_column(name, footer=footer, justify="right" if right else "left")
  for key, r in rows.items():
    st = status(r["labels"])
    table.add_row(key, f"{r['params']:,}", f"[{'green' if st == 'trainable' else 'cyan'}]{st}",
                  mib(r["bytes"]), mib(r["opt_bytes"]), mib(r["device_bytes"] + r["opt_device_bytes"]))
  console.print(table)
  if per_param:
    t = Table(title="params: shape, sharding and per-device bytes")
    for name in ("param", "shape", "status", "PartitionSpec", "per device KiB (param + opt)"):
      t.add_column(name)
    for path, st in stats.items():
      t.add_row(path, str(st["shape"]), "trainable" if st["label"] == "train" else "frozen", str(st["spec"]),
                f"{(st['device_bytes'] + st['opt_device_bytes']) / 1024:,.1f}")
    console.print(t)
  console.print(f"{parallel.describe(mesh)}; {exp.total_steps} train steps; optimizer {exp.cfg.optim.name}")
  if exp.cfg.model.quantize:
    held, floats = quantize.param_bytes(jax.eval_shape(exp.initial_state).params)
    console.print(f"model.quantize={exp.cfg.model.quantize}: params {mib(held)} MiB held, {mib(floats)} MiB were its "
                  f"quantized kernels float32 ({floats / held:.2f}x)")
  if exp.backbone.batch_norm:  # model state beside the params
    kept = exp.frozen_bn(0)
    console.print(f"BatchNorm: {len(exp.backbone.batch_norm)} layers, {rules.count(exp.state_shapes().model_state):,} running "
                  f"statistics; in training {len(kept)} keep theirs (model.bn={exp.cfg.model.bn}"
                  f"{', and the frozen layers' if exp.cfg.model.bn == 'train' else ''}), the others update")
  if len(exp.phases) > 1:  # the table shows the first phase
    console.print("phases: " + ", ".join(
        f"{p.name} (<= {p.max_steps} steps, {rules.count(rules.split(exp.state_shapes().params, p.labels, 'train')[0]):,} "
        f"trainable, {p.cfg.optim.name} lr {p.cfg.optim.lr:g})" for p in exp.phases))
  return rows
