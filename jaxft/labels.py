"""A run's labels: what its head's outputs stand for (class names, BIO tags, regression targets), in order.

They are stored with every checkpoint (RunRecord.labels) and beside an exported head (labels.json). A resumed
run, `jaxft eval` / `export` / `soup` and a run starting from an exported head take that order, so the data's
labels map to the head's outputs by name; data with a label the head was not trained on is refused.
"""
import json
from pathlib import Path

from jaxft import assets
from jaxft.errors import JaxftError

FILE = "labels.json"  # beside an exported head


def adopt(task, stored: list | None, origin: str, advice: str, log=print) -> None:
  """Orders `task`'s labels as `stored` (None: nothing stored, an older run); origin names where they were
  stored, and advice what to do instead, for the messages."""
  current = task.label_names
  if stored is None or current is None or list(current) == list(stored):
    return
  extra = [n for n in current if n not in stored]
  if extra:
    raise JaxftError(f"the labels {_short(current)} include {_short(extra)}, which {origin} was not trained on (its "
                     f"labels: {_short(stored)}): the label set changed; {advice}")
  task.relabel(list(stored), origin)
  log(f"labels: in the order of {origin} ({len(stored)}: {_short(stored)})")


def save(names: list | None, out_dir: Path) -> None:
  if names is not None:
    (Path(out_dir) / FILE).write_text(json.dumps(list(names)) + "\n")


def exported(model_dir) -> list | None:
  """The labels saved beside an exported head in `model_dir`, if any."""
  path = Path(model_dir) / FILE
  if not path.is_file():
    return None
  names = assets.json_value(path)
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise JaxftError(f"{path}: not a JSON list of label names")
  return names


def _short(names: list, n: int = 12) -> str:
  return str(list(names[:n]))[:-1] + (f", ... {len(names) - n} more]" if len(names) > n else "]")
