"""Writes the PyTorch-pickle fixtures of tests/test_formats.py. Needs torch; the tests never import it.

  python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch safetensors numpy
  /tmp/torchvenv/bin/python tests/data/torch_pickles/make.py

Made with torch 2.13.0+cpu and safetensors 0.8.0:
  pytorch_model.bin   torch.save(state_dict)                                      zip format
  legacy.bin          torch.save(state_dict, _use_new_zipfile_serialization=False) legacy format,
                      without u16 and f8 (dtypes the legacy format cannot hold)
  model.safetensors   the same tensors as contiguous copies (safetensors.torch.save_file), without u16, f8
  new_dtypes.safetensors   u16 and f8 (zip pickles hold them as UntypedStorage + _rebuild_tensor_v3)
  wrapped.pt          {"state_dict": {f32, i64}, "epoch": 3, "args": {...}}: a training checkpoint
  big_endian.bin      {"w", "wt"} (float32) in the zip format, rewritten with byteorder "big"
"""
import collections
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
NEW = ("u16", "f8")


def state_dict():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(24, generator=g)
  sd = collections.OrderedDict([
      ("f32", torch.randn(4, 5, generator=g)),
      ("f16", torch.randn(3, 4, generator=g).half()),
      ("bf16", torch.randn(2, 8, generator=g).bfloat16()),
      ("f64", torch.randn(3, generator=g).double()),
      ("i64", torch.arange(10) - 3),
      ("i32", torch.arange(6, dtype=torch.int32).reshape(2, 3)),
      ("u8", torch.arange(250, 256, dtype=torch.uint8)),
      ("bool", torch.tensor([True, False, True])),
      ("transposed", torch.randn(3, 6, generator=g).t()),       # strides (1, 6)
      ("view_a", base[:12].view(3, 4)),                         # two views of one storage
      ("view_b", base[6:].view(2, 9)[:, ::2]),                  # offset 6, strides (9, 2)
      ("scalar", torch.tensor(3.5)),                            # 0-dim
      ("param", torch.nn.Parameter(torch.randn(2, 3, generator=g))),  # _rebuild_parameter
      ("empty", torch.zeros(0, 4)),
      ("u16", torch.arange(65530, 65536).to(torch.uint16)),    # UntypedStorage + _rebuild_tensor_v3
      ("f8", torch.tensor([1.5, -2.0, 448.0]).to(torch.float8_e4m3fn)),
  ])
  sd._metadata = collections.OrderedDict([("", {"version": 1})])  # as nn.Module.state_dict() has
  return sd


def big_endian(sd, path):
  """torch.save's zip format with every storage byteswapped and a "big" byteorder record."""
  small = {"w": sd["f32"], "wt": sd["transposed"]}  # float32 only: each record swaps in 4-byte units
  buf = io.BytesIO()
  torch.save(small, buf)
  with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
      data = src.read(info)
      if "/data/" in info.filename:
        data = np.frombuffer(data, np.uint32).byteswap().tobytes()
      elif info.filename.endswith("/byteorder"):
        data = b"big"
      dst.writestr(info.filename, data)
  return small


def main():
  sd = state_dict()
  torch.save(sd, HERE / "pytorch_model.bin")
  old = collections.OrderedDict((k, v) for k, v in sd.items() if k not in NEW)
  old._metadata = sd._metadata
  torch.save(old, HERE / "legacy.bin", _use_new_zipfile_serialization=False)
  copies = {k: v.detach().contiguous().clone() for k, v in sd.items()}
  save_file({k: v for k, v in copies.items() if k not in NEW}, str(HERE / "model.safetensors"),
            metadata={"format": "pt"})
  save_file({k: copies[k] for k in NEW}, str(HERE / "new_dtypes.safetensors"), metadata={"format": "pt"})
  torch.save({"state_dict": {k: sd[k] for k in ("f32", "i64")}, "epoch": 3, "args": {"lr": 0.1}},
             HERE / "wrapped.pt")
  small = big_endian(sd, HERE / "big_endian.bin")
  for name, want in (("pytorch_model.bin", sd), ("legacy.bin", old), ("big_endian.bin", small)):
    got = torch.load(HERE / name, weights_only=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    print(name, "loads back equal with torch", torch.__version__, file=sys.stderr)


if __name__ == "__main__":
  main()
