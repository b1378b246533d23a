"""Every `jaxft ...` command in README.md and docs/ is accepted: the CLI parses it and its config and overrides
load (a key that moved or a misspelt option fails here, not in a reader's terminal). Usage summaries stand in
for real values: CONFIG, DIR, RUN_DIR, FILE, NAME and N become examples, and [optional] parts are kept."""
import re
import shlex
from pathlib import Path

import pytest

from jaxft.cli import _parse
from jaxft.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r'\bjaxft (?:train|eval|inspect|export|bench|generate|interpolate|soup|plan|plot)\b(?:"[^"]*"|[^`"#&;\n])*')
EXAMPLES = {"CONFIG": "configs/default.yaml", "RUN_DIR": "runs/x", "DIR": "/tmp/out", "FILE": "x.png",
            "NAME": "v5e:2x2", "N": "2"}


def commands(text: str) -> list[str]:
  """The jaxft commands of fenced shell blocks (one a line, continuations joined) and of inline code."""
  found = []
  for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
    if lang in ("", "bash", "sh"):
      lines = block.replace("\\\n", " ").splitlines()
      found += [m.group(0).split(" | ")[0] for line in lines for m in COMMAND.finditer(line)]
  prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
  found += [m.group(0) for span in re.findall(r"`([^`]+)`", prose) for m in COMMAND.finditer(span)]
  return [c.strip() for c in found if len(c.split()) > 2 or c.strip() == "jaxft train"]  # bare names are mentions


def argv(command: str) -> list[str]:
  """The command's words as the shell gives them; the usage notation is read outside quotes only (a quoted
  override may hold a YAML list: 'train.sweep={optim.lr: [1e-4, 3e-5]}')."""
  parts = re.split(r"""('[^']*'|"[^"]*")""", command)
  for i in range(0, len(parts), 2):
    part = re.sub(r"\[(overrides|\.\.\.)\]|\[RUN_DIR\.\.\.\]", "", parts[i])
    part = re.sub(r"\[([^\]]*)\]", r"\1", part)  # an optional part, taken
    parts[i] = re.sub(r"(--\w[\w-]*) (\w+)\|\w+", r"\1 \2", part)  # a choice: the first
  return [EXAMPLES.get(w, w) for w in shlex.split("".join(parts))[1:]]


DOC_COMMANDS = sorted({(p.name, c) for p in PAGES for c in commands(p.read_text())})


def test_the_docs_hold_commands():
  assert len(DOC_COMMANDS) > 40 and {p for p, _ in DOC_COMMANDS} >= {"README.md", "scaling.md", "replicas.md"}


@pytest.mark.parametrize("page,command", DOC_COMMANDS)
def test_command_parses_and_its_config_loads(page, command, monkeypatch):
  monkeypatch.chdir(ROOT)
  args, config = _parse(argv(command))
  if args.command != "plot":
    load_config(config, tuple(args.args))


def test_a_moved_key_fails_here():
  with pytest.raises(Exception, match="config key 'model.task' is now 'task.name'"):
    args, config = _parse(argv("jaxft train model.task=sft"))
    load_config(config, tuple(args.args))
