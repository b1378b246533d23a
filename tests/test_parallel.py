"""Same losses on 1 device and on 8 (fake CPU) devices under every strategy; specs from rules."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

HERE = Path(__file__).parent
COMMON = "train.epochs=0.625,train.log_every=1,freeze_embeddings=true,freeze_bottom_layers=1"


def run_devices(n, root, runs: dict, timeout=600) -> dict:
  """Runs tests/multidevice_run.py with n fake CPU devices; SIGKILLs it if it hangs."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
  args = [f"{k}={COMMON},{v}" for k, v in runs.items()]
  proc = subprocess.Popen([sys.executable, str(HERE / "multidevice_run.py"), str(root), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"{n}-device run hung and was killed")
  assert proc.returncode == 0, out[-3000:]
  return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def workdir(tiny_bert, tiny_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("multidevice")
  shutil.copytree(tiny_bert["pt"], root / "tiny_bert" / "pt")
  shutil.copytree(tiny_data, root / "tiny_data")
  return root


def test_every_strategy_matches_one_device(workdir):
  one = run_devices(1, workdir, {"ref": "", "ref_nodrop": "train.dropout=false"})
  assert len(one["ref"]) == 10
  eight = run_devices(8, workdir, {
      "dp": "parallel.mesh.data=8",
      "fsdp": "parallel.mesh.data=1,parallel.mesh.fsdp=8",
      "tp": "parallel.mesh.data=1,parallel.mesh.tensor=8",
      "dp_tp": "parallel.mesh.data=4,parallel.mesh.tensor=2",
      "fsdp_tp": "parallel.mesh.data=1,parallel.mesh.fsdp=4,parallel.mesh.tensor=2",
      # pmap drops out different units per device, so it is compared without dropout
      "pmap": "parallel.backend=pmap,train.dropout=false",
  })
  for name, losses in eight.items():
    ref = np.array(one["ref_nodrop" if name == "pmap" else "ref"])
    rel = np.max(np.abs(np.array(losses) - ref) / np.abs(ref))
    print(f"{name}: max rel diff {rel:.2e}")
    assert rel <= 1e-5, (name, rel, losses, ref.tolist())


def test_param_specs_follow_rules_and_fsdp(monkeypatch):
  import jax
  import jax.numpy as jnp
  from jaxft import parallel
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), parallel.AXES)
  params = {"bert": {"encoder": {"layer": {"0": {
      "attention": {"self": {"query": {"kernel": jnp.zeros((8, 8))}}, "output": {"dense": {"kernel": jnp.zeros((8, 8))}}},
      "intermediate": {"dense": {"kernel": jnp.zeros((8, 16))}}}}}}, "classifier": {"kernel": jnp.zeros((8, 2))}}
  specs = parallel.rules_lib.flat(parallel.param_specs(params, [["classifier/.*", [None, "tensor"]]], mesh))
  layer = "bert/encoder/layer/0/"
  assert specs[layer + "attention/self/query/kernel"] == P(None, "tensor")
  assert specs[layer + "attention/output/dense/kernel"] == P("tensor", None)
  assert specs[layer + "intermediate/dense/kernel"] == P(None, "tensor")
  assert specs["classifier/kernel"] == P(None, "tensor")
  with pytest.raises(parallel.JaxftError, match="sharding rule 'nope/.*' matches no parameter path"):
    parallel.param_specs(params, [["nope/.*", ["tensor"]]], mesh)


def test_fit_adds_fsdp_on_largest_divisible_dim():
  from jaxft.parallel import _fit

  class Mesh:
    shape = {"data": 1, "fsdp": 4, "tensor": 2}
  assert _fit((None, "tensor"), (384, 1536), Mesh, "k") == P("fsdp", "tensor")
  assert _fit(("tensor", None), (30522, 384), Mesh, "emb") == P("tensor", "fsdp")  # 30522 % 2 == 0
  assert _fit(("tensor", None), (25, 32), Mesh, "emb") == P(None, "fsdp")  # 25 % 2 != 0: replicated
  assert _fit((), (6,), Mesh, "b") == P(None)
