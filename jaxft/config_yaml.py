"""The one YAML reader of config files and override values: PyYAML's safe loader, with numbers such as 1e-4
read as floats wherever they stand (YAML 1.1 wants 1.0e-4), a key given twice in one mapping refused (PyYAML
keeps the last silently), and errors as one line with the line and column.
"""
import re

import yaml

from jaxft.errors import JaxftError


class _Loader(yaml.SafeLoader):
  pass


class _Dumper(yaml.SafeDumper):
  """Writes what _Loader reads back alike (a string such as '1e5' quoted, not read back as a float)."""


FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):  # a copy of the resolvers: add_implicit_resolver would extend PyYAML's shared lists
  _cls.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
  _cls.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT, list("-+0123456789"))


def _mapping(loader, node, deep=False):
  seen = {}
  for key_node, _ in node.value:
    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
      continue
    key = loader.construct_object(key_node, deep=deep)
    try:
      twice = key in seen
    except TypeError:  # an unhashable key: SafeLoader's own error names it
      break
    if twice:
      raise JaxftError(f"key '{key}' is given twice in one mapping (lines {seen[key] + 1} and "
                       f"{key_node.start_mark.line + 1}); YAML would keep the second only: merge them")
    seen[key] = key_node.start_mark.line
  return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        lambda loader, node: _mapping(loader, node, deep=True))


def load(text: str, where: str):
  """The value of YAML `text`; `where` (a file, or an override) starts every error."""
  try:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
  except JaxftError as e:
    raise JaxftError(f"{where}: {e}") from None
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark or e.context_mark
    at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    problem = "a tab: YAML indents with spaces only" if "'\\t'" in str(e.problem) else e.problem
    raise JaxftError(f"{where}{at}: not valid YAML: {problem}") from None
  except yaml.YAMLError as e:
    raise JaxftError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None


def dump(value) -> str:
  return yaml.dump(value, Dumper=_Dumper, sort_keys=False)
