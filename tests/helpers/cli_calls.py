"""Subprocess driver: several `jaxft` command lines, one after another in one process (jax starts once).

  python tests/helpers/cli_calls.py CALLS.json

CALLS.json holds a list of argument lists; each is run through jaxft.cli.main as the `jaxft` command runs it.
Prints one line `RESULT [...]`: each call's exit code, stdout and stderr.
"""
import contextlib
import io
import json
import sys
import traceback

from jaxft import cli


def call(args: list[str]) -> dict:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = cli.main(args)
    except SystemExit as e:  # argparse's usage errors
      code = e.code
    except Exception:  # noqa: BLE001 (as the command would end: a traceback, exit 1)
      traceback.print_exc()
      code = 1
  return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
  results = [call(args) for args in json.loads(open(sys.argv[1]).read())]
  print("RESULT " + json.dumps(results), flush=True)
