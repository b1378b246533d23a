"""PyTorch pickles (`torch.save`) -> {state-dict name: numpy array}, read without torch.

Two layouts (see torch/serialization.py):
  zip (torch >= 1.6): `<dir>/data.pkl` pickles the object; storage `k` is the stored record `<dir>/data/k`,
    in the byte order of the `<dir>/byteorder` record (little when absent).
  legacy: pickled magic number, protocol version and sys_info, the pickled object, the pickled list of
    storage keys, then per storage an 8-byte element count and the raw bytes.
Tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls on storages that
are persistent ids. A pickle is code, so the unpickler resolves only the globals that state dicts need
(find_class raises JaxftError for any other) to stand-ins that record each tensor; arrays are cut from
the storages' bytes afterwards (`as_strided`, bounds-checked, copied). Nothing from the file runs.

Only tensors are returned: other entries (ints, strings, nested dicts) are dropped. A top-level dict that
holds no tensor itself but a dict of them under one of WRAPPERS (a training checkpoint) yields that dict.
"""
import collections
import io
import mmap
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxft.errors import JaxftError

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001
WRAPPERS = ("state_dict", "model_state_dict", "model")

# Storage classes (torch.FloatStorage, torch.cuda.HalfStorage, torch.storage.UntypedStorage) -> dtype.
_STORAGES = {
  "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
  "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
# torch dtypes, pickled as globals (torch.uint16) for _rebuild_tensor_v3 on an UntypedStorage.
_DTYPES = {
  "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint64": np.uint64,
  "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
  "complex128": np.complex128, "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
  "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
  "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
}
_ALLOWED_DTYPES = {np.dtype(d) for d in _DTYPES.values()}


class _Sealed:
  """Base of all that find_class hands out: a pickle may call it, never change it (its BUILD raises), so
  one file cannot alter how the next is read."""
  __slots__ = ()

  def __setstate__(self, state):
    raise JaxftError(f"the pickle tries to set attributes of {type(self).__name__.strip('_')}")


class _Fn(_Sealed):
  __slots__ = ("fn",)

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args):
    return self.fn(*args)


class _Dtype(_Sealed):
  """A torch dtype (torch.uint16) or storage class (torch.FloatStorage): only the element type matters."""
  __slots__ = ("dtype",)

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _Storage(_Sealed):
  """`nbytes` bytes at byte `offset` of root storage `key` (legacy storage views have offset > 0)."""
  __slots__ = ("key", "dtype", "offset", "nbytes")

  def __init__(self, key, dtype, offset, nbytes):
    self.key, self.dtype, self.offset, self.nbytes = key, dtype, offset, nbytes


class _Tensor(_Sealed):
  """A tensor to cut from its storage once the storages' bytes are known (offset and strides in elements)."""
  __slots__ = ("storage", "offset", "size", "stride", "dtype", "metadata")

  def __init__(self, storage, offset, size, stride, dtype, metadata):
    if not isinstance(storage, _Storage):
      raise JaxftError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage")
    if not (isinstance(dtype, np.dtype) and dtype in _ALLOWED_DTYPES):
      raise JaxftError(f"a tensor of unsupported dtype {dtype}")
    self.storage, self.offset, self.dtype = storage, int(offset), dtype
    self.size, self.stride = tuple(map(int, size)), tuple(map(int, stride))
    self.metadata = metadata if isinstance(metadata, dict) else {}


def _rebuild_tensor(storage, offset, size, stride):
  return _Tensor(storage, offset, size, stride, getattr(storage, "dtype", None), None)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  return _Tensor(storage, offset, size, stride, getattr(storage, "dtype", None), metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
  return _Tensor(storage, offset, size, stride, getattr(dtype, "dtype", None), metadata)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):  # a Tensor subclass (Parameter): the tensor
  return func(*args)


_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _Fn(_rebuild_tensor),
  ("torch._utils", "_rebuild_tensor_v2"): _Fn(_rebuild_tensor_v2),
  ("torch._utils", "_rebuild_tensor_v3"): _Fn(_rebuild_tensor_v3),
  ("torch._utils", "_rebuild_parameter"): _Fn(_rebuild_parameter),
  ("torch._utils", "_rebuild_parameter_with_state"): _Fn(_rebuild_parameter),
  ("torch._tensor", "_rebuild_from_type_v2"): _Fn(_rebuild_from_type_v2),
  ("torch.nn.parameter", "Parameter"): "Parameter",  # types passed to _rebuild_from_type_v2, never called
  ("torch._tensor", "Tensor"): "Tensor",
  ("torch", "Tensor"): "Tensor",
  ("torch", "Size"): tuple,
  ("torch", "device"): _Fn(lambda *args: ":".join(map(str, args))),
  ("_codecs", "encode"): _Fn(lambda text, encoding="latin1": text.encode(encoding)),  # bytes, protocol 2
  ("builtins", "set"): set,
  ("builtins", "frozenset"): frozenset,
  ("builtins", "complex"): complex,
  ("builtins", "bytearray"): bytearray,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only _GLOBALS, storage classes and dtypes; records storages in `storages` by key."""

  def __init__(self, file, storages: dict):
    super().__init__(file, encoding="utf-8")
    self.storages = storages

  def find_class(self, module, name):
    module = "builtins" if module == "__builtin__" else module
    if (module, name) in _GLOBALS:
      return _GLOBALS[module, name]
    if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGES:
      return _Dtype(_STORAGES[name])
    if module == "torch" and name in _DTYPES:
      return _Dtype(_DTYPES[name])
    raise JaxftError(f"refusing global {module}.{name}: a pickle can run code, and only what state dicts "
                     f"need is allowed (a pickled nn.Module? save its state_dict() instead)")

  def persistent_load(self, pid):
    # zip: ("storage", type, key, location, numel); legacy adds view_metadata (view_key, offset, numel)
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _Dtype)):
      raise JaxftError(f"unsupported persistent id {str(pid)[:80]}")
    dtype, key, numel = pid[1].dtype, _str(pid[2]), int(pid[4])
    root = self.storages.setdefault(key, _Storage(key, dtype, 0, numel * dtype.itemsize))
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return root
    _, offset, size = view
    return _Storage(key, root.dtype, int(offset) * root.dtype.itemsize, int(size) * root.dtype.itemsize)


def read(path: Path) -> dict[str, np.ndarray]:
  """The tensors of the state dict that `path` holds (zip or legacy torch.save format)."""
  path = Path(path)
  try:
    with open(path, "rb") as f:
      head = f.read(512)
    if head[257:262] == b"ustar":
      raise JaxftError("the tar format of torch.save before 0.4 is not supported")
    obj, buffer, big = (_load_zip if head[:4] == b"PK\x03\x04" else _load_legacy)(path)
    state = _state_dict(obj)
    return {_str(k): _array(v, buffer(v.storage.key), big) for k, v in state.items() if isinstance(v, _Tensor)}
  except Exception as e:  # a malformed pickle raises anything: one line naming the file and the reason
    line = (str(e).strip().splitlines() or [""])[0]
    reason = line if isinstance(e, JaxftError) else f"{type(e).__name__}: {line}".rstrip(": ")
    raise JaxftError(f"cannot read PyTorch pickle {path}: {reason}") from None


def _load_zip(path: Path):
  storages = {}
  with zipfile.ZipFile(path) as z:
    names = set(z.namelist())
    pickles = sorted((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), key=lambda n: n.count("/"))
    if not pickles:
      raise JaxftError("a zip archive without data.pkl, not a torch.save file")
    prefix = pickles[0][:-len("data.pkl")]
    if prefix + "constants.pkl" in names:
      raise JaxftError("a TorchScript archive (torch.jit.save): torch.save a state_dict() instead")
    order = z.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
    if order not in ("little", "big"):
      raise JaxftError(f"unknown byteorder {order[:20]!r}")
    obj = _Unpickler(io.BytesIO(z.read(pickles[0])), storages).load()
    infos = {k: z.getinfo(f"{prefix}data/{k}") for k in storages}
    compressed = {k: z.read(i) for k, i in infos.items() if i.compress_type != zipfile.ZIP_STORED}
  mm = _mmap(path)

  def buffer(key):  # a stored record's bytes, in place: local header (30 bytes + name + extra), then data
    if key in compressed:
      return compressed[key]
    h = infos[key].header_offset
    if mm[h:h + 4] != b"PK\x03\x04":
      raise JaxftError(f"bad zip local header for storage {key}")
    start = h + 30 + int.from_bytes(mm[h + 26:h + 28], "little") + int.from_bytes(mm[h + 28:h + 30], "little")
    return memoryview(mm)[start:start + infos[key].file_size]
  return obj, buffer, order == "big"


def _load_legacy(path: Path):
  storages = {}
  with open(path, "rb") as f:
    try:
      magic = _Unpickler(f, storages).load()
    except Exception:
      magic = None
    if magic != MAGIC:
      raise JaxftError("not a torch.save file: neither a zip archive nor a pickle with torch's magic number")
    protocol = _Unpickler(f, storages).load()
    if protocol != PROTOCOL:
      raise JaxftError(f"legacy protocol version {protocol}, expected {PROTOCOL}")
    info = _Unpickler(f, storages).load()
    obj = _Unpickler(f, storages).load()
    keys = _Unpickler(f, storages).load()
    pos = f.tell()
  big = isinstance(info, dict) and info.get("little_endian") is False
  mm, buffers = _mmap(path), {}
  for key in map(_str, keys):
    if key not in storages:
      raise JaxftError(f"storage {key} is listed but no tensor uses it")
    count = int.from_bytes(mm[pos:pos + 8], "big" if big else "little")
    end = pos + 8 + count * storages[key].dtype.itemsize
    if end > len(mm):
      raise JaxftError(f"truncated: storage {key} ends at byte {end}, past the end of the file ({len(mm)})")
    buffers[key] = memoryview(mm)[pos + 8:end]
    pos = end
  return obj, buffers.__getitem__, big


def _mmap(path: Path) -> mmap.mmap:
  with open(path, "rb") as f:
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _state_dict(obj) -> dict:
  if not isinstance(obj, dict):
    raise JaxftError(f"holds a {type(obj).__name__}, not a state dict")
  if any(isinstance(v, _Tensor) for v in obj.values()):
    return obj
  for key in WRAPPERS:
    inner = obj.get(key)
    if isinstance(inner, dict) and any(isinstance(v, _Tensor) for v in inner.values()):
      return inner
  raise JaxftError(f"no tensors at the top level or under {'/'.join(WRAPPERS)} (keys: {list(obj)[:8]})")


def _array(t: _Tensor, buf, big: bool) -> np.ndarray:
  """The tensor's elements from its storage's bytes, as a new C-contiguous array."""
  s, n = t.storage, t.dtype.itemsize
  if len(t.size) != len(t.stride) or min(t.size + t.stride + (t.offset,), default=0) < 0:
    raise JaxftError(f"bad tensor geometry: size {t.size}, stride {t.stride}, offset {t.offset}")
  if 0 in t.size:
    return np.zeros(t.size, t.dtype)
  if s.offset + s.nbytes > len(buf):
    raise JaxftError(f"storage {s.key} is shorter ({len(buf)} bytes) than recorded")
  flat = np.frombuffer(buf, t.dtype, count=s.nbytes // n, offset=s.offset)
  last = t.offset + sum((size - 1) * stride for size, stride in zip(t.size, t.stride))
  if last >= len(flat):
    raise JaxftError(f"a tensor reaches element {last} of storage {s.key}, which has {len(flat)}")
  out = np.lib.stride_tricks.as_strided(flat[t.offset:], t.size, [stride * n for stride in t.stride],
                                        writeable=False).copy()
  if big and n > 1:  # swap bytes in place; a complex number is two floats
    unit = n // 2 if t.dtype.kind == "c" else n
    out.reshape(-1).view(f"u{unit}").byteswap(inplace=True)
  if t.metadata.get("neg"):
    out = -out
  if t.metadata.get("conj"):
    out = np.conj(out)
  return out


def _str(key) -> str:
  return key.decode() if isinstance(key, bytes) else str(key)
