"""`jaxft inspect`: the param tree folded by subtree, with freeze status, counts and bytes."""
import jax
from rich.console import Console
from rich.table import Table

from jaxft import rules


def fold_key(path: str, depth: int | None) -> str:
  """Subtree a path is folded into: up to its layer index (…/layer/3), else its first 2 keys."""
  parts = path.split("/")[:-1] or path.split("/")
  if depth is None:
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    depth = numeric[0] + 1 if numeric else 2
  return "/".join(parts[:depth])


def opt_bytes_per_param(opt_state, param_paths) -> tuple[dict, int]:
  """Optimizer-state bytes attributed to each param path, plus bytes not tied to any param."""
  per, other = {p: 0 for p in param_paths}, 0
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey)]
    nbytes = leaf.size * leaf.dtype.itemsize
    for start in range(len(keys)):
      cand = "/".join(keys[start:])
      if cand in per:
        per[cand] += nbytes
        break
    else:
      other += nbytes
  return per, other


def report(exp, depth: int | None = None, console: Console | None = None) -> dict:
  """Prints the table; returns the per-subtree rows (for tests)."""
  console = console or Console()
  if console.width < 120 and not console.is_terminal:  # do not squeeze paths in logs and pipes
    console = Console(width=120)
  params = exp.state.params
  flat, labels = rules.flat(params), rules.flat(exp.labels)
  opt_per, opt_other = opt_bytes_per_param(exp.state.opt_state, flat)
  rows: dict[str, dict] = {}
  for path, x in flat.items():
    row = rows.setdefault(fold_key(path, depth), {"params": 0, "labels": set(), "bytes": 0, "opt_bytes": 0})
    row["params"] += x.size
    row["labels"].add(labels[path])
    row["bytes"] += x.size * x.dtype.itemsize
    row["opt_bytes"] += opt_per[path]

  table = Table(title=f"{exp.model.name}", show_footer=True)
  status = lambda ls: "mixed" if len(ls) > 1 else ("trainable" if "train" in ls else "frozen")
  mb = lambda b: f"{b / 2**20:,.2f}"
  tot = {k: sum(r[k] for r in rows.values()) for k in ("params", "bytes", "opt_bytes")}
  n_train = sum(x.size for path, x in flat.items() if labels[path] == "train")
  table.add_column("subtree", footer="total")
  table.add_column("params", justify="right", footer=f"{tot['params']:,}")
  table.add_column("status", footer=f"{n_train:,} trainable")
  table.add_column("param MiB", justify="right", footer=mb(tot["bytes"]))
  table.add_column("opt-state MiB", justify="right", footer=mb(tot["opt_bytes"] + opt_other))
  for key, r in rows.items():
    st = status(r["labels"])
    table.add_row(key, f"{r['params']:,}", f"[{'green' if st == 'trainable' else 'cyan'}]{st}",
                  mb(r["bytes"]), mb(r["opt_bytes"]))
  console.print(table)
  console.print(f"{exp.total_steps} train steps; optimizer {exp.cfg.optim.name}, "
                f"{opt_other} bytes of optimizer scalars")
  return rows
