import hashlib

import pytest

from jaxft import assets
from jaxft.errors import JaxftError


def test_local_path_and_missing(tmp_path):
  assert assets.resolve(str(tmp_path)) == tmp_path
  with pytest.raises(JaxftError, match="asset not found: .*/missing"):
    assets.resolve(str(tmp_path / "missing"))


@pytest.mark.parametrize("ref,message", [
    ("pypi:six", "bad pypi reference"),
    ("pypi:six==1.16.0#md5=00", r"unknown option\(s\) \['md5'\]"),
])
def test_bad_pypi_refs(ref, message):
  with pytest.raises(JaxftError, match=message):
    assets.resolve(ref)


def test_hf_offline_is_one_clear_line(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(JaxftError) as e:
    assets.resolve("hf:some-org/some-model")
  assert str(e.value).startswith("could not fetch hf:some-org/some-model") and "\n" not in str(e.value)


def test_pypi_fetch_unpack_once_and_sha256(tmp_path, monkeypatch):
  """Fetches a small real wheel from PyPI (reachable here and in CI)."""
  monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
  with pytest.raises(JaxftError, match="sha256 mismatch for six-1.16.0-py2.py3-none-any.whl") as e:
    assets.resolve("pypi:six==1.16.0/six.py#sha256=" + "0" * 64)
  pypi_cache = tmp_path / "cache" / "pypi"
  assert not pypi_cache.exists() or not any(pypi_cache.iterdir())  # nothing half-unpacked left behind
  digest = str(e.value).split()[-1]
  path = assets.resolve(f"pypi:six==1.16.0/six.py#sha256={digest}")
  assert path.name == "six.py" and "Benjamin Peterson" in path.read_text()
  monkeypatch.setattr(assets, "_fetch_pypi", None)  # from now on, only the cache may answer
  assert assets.resolve("pypi:six==1.16.0/six.py") == path
  with pytest.raises(JaxftError, match="sha256 mismatch for the cached six-1.16.0"):
    assets.resolve("pypi:six==1.16.0/six.py#sha256=" + hashlib.sha256(b"").hexdigest())
  with pytest.raises(JaxftError, match="no 'nope.py' inside the wheel of six==1.16.0"):
    assets.resolve("pypi:six==1.16.0/nope.py")
