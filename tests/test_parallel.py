"""Same losses on 1 device and on 8 (fake CPU) devices under every strategy; specs from rules."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags
from jax.sharding import PartitionSpec as P

HERE = Path(__file__).parent
COMMON = "train.epochs=0.625,train.log_every=1,freeze_embeddings=true,freeze_bottom_layers=1"


TIMEOUT = 900  # s per driver process; it dumps its threads' stacks 60 s before (tests/helpers/multidevice_run.py)


def start(n, root, runs: dict, common=COMMON, env=None):
  # fake devices are threads sharing 2 cores: on a loaded machine a collective can wait for its slowest
  # participant longer than XLA's default 40 s before it aborts the process
  flags = xla_flags(f"--xla_force_host_platform_device_count={n}", "--xla_cpu_collective_call_terminate_timeout_seconds=600")
  env = dict(os.environ, XLA_FLAGS=flags, JAXFT_TEST_DUMP_AFTER=str(TIMEOUT - 60), **(env or {}))
  args = [f"{k}={common},{v}" for k, v in runs.items()]
  return subprocess.Popen([sys.executable, str(HERE / "helpers" / "multidevice_run.py"), str(root), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=TIMEOUT) -> dict:
  """Waits for the driver processes; SIGKILLs all of them if any hangs (failing with what each printed: the
  runs it finished and, from faulthandler, where its threads were). Returns process 0's result."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()  # SIGKILL: a hung jax.distributed process ignores SIGTERM
    printed = "\n".join(f"--- process {i}:\n{p.communicate()[0][-4000:]}" for i, p in enumerate(procs))
    pytest.fail(f"a multi-device run hung and was killed after {timeout} s\n{printed}")
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return json.loads(next(l for l in outs[0].splitlines() if l.startswith("RESULT "))[7:])


def run_devices(n, root, runs: dict, common=COMMON) -> dict:
  """Runs tests/helpers/multidevice_run.py with n fake CPU devices."""
  return finish([start(n, root, runs, common)])


def side_by_side(root, jobs, common=COMMON) -> list:
  """[(n devices, runs), ...] run as drivers at once (a 1-device one leaves a core mostly idle): results."""
  procs = [start(n, root, runs, common) for n, runs in jobs]
  try:
    return [finish([p]) for p in procs]
  finally:
    for p in procs:
      p.kill()  # the others, when one failed


def assert_close(losses, ref, name, tol=1e-5):
  rel = np.max(np.abs(np.array(losses) - np.array(ref)) / np.abs(np.array(ref)))
  print(f"{name}: max rel diff {rel:.2e}")
  assert len(losses) == len(ref) and rel <= tol, (name, rel, losses, ref)


@pytest.fixture(scope="module")
def workdir(tiny_bert, tiny_data, tmp_path_factory):
  from test_token_classification import write_ner
  root = tmp_path_factory.mktemp("multidevice")
  shutil.copytree(tiny_bert["pt"], root / "tiny_bert" / "pt")
  shutil.copytree(tiny_data, root / "tiny_data")
  for split, n, seed in (("train", 128, 0), ("validation", 40, 1), ("test", 40, 2)):
    write_ner(root / "tiny_data" / f"{split}.conll", n, seed)
  return root


LORA = "lora.targets=[.*/attention/self/(query|value)/kernel]"
NER = ("task.name=token_classification,train.epochs=8," + ",".join(f"data.{s}={{root}}/tiny_data/{s}.conll"
                                                                    for s in ("train", "validation", "test")))
PHASES = "phases=[{name: head, train_only: [classifier/.*], steps: 3}, {name: top, freeze_bottom_layers: 2, steps: 7}]"


def test_every_strategy_matches_one_device(workdir):
  ner = NER.format(root=workdir)
  one, eight = side_by_side(workdir, [
    (1, {"ref": "", "ref_nodrop": "train.dropout=false", "lora": LORA, "phases": PHASES,
         "ner": ner, "ner_nodrop": f"{ner},train.dropout=false"}),
    (8, {
      "dp": "parallel.mesh.data=8",
      "fsdp": "parallel.mesh.data=1,parallel.mesh.fsdp=8",
      "tp": "parallel.mesh.data=1,parallel.mesh.tensor=8",
      # pmap drops out different units per device, so it is compared without dropout
      "pmap": "parallel.backend=pmap,train.dropout=false",
      # mixed meshes: adapters sharded like their kernels; a phase switch re-shards the new optimizer state
      "lora_dp_tp": f"parallel.mesh.data=4,parallel.mesh.tensor=2,{LORA}",
      "phases_fsdp_tp": f"parallel.mesh.data=1,parallel.mesh.fsdp=4,parallel.mesh.tensor=2,{PHASES}",
      # per-token outputs gathered from every device for the host-side entity metrics
      "ner_fsdp": f"parallel.mesh.data=1,parallel.mesh.fsdp=8,{ner}",
      "ner_pmap": f"parallel.backend=pmap,{ner},train.dropout=false",
    })])
  assert len(one["ref"]) == 10
  ref = {"pmap": "ref_nodrop", "lora_dp_tp": "lora", "phases_fsdp_tp": "phases", "ner_fsdp": "ner",
         "ner_pmap": "ner_nodrop"}
  for name, losses in eight.items():
    if not name.endswith("/test"):
      assert_close(losses, one[ref.get(name, "ref")], name)
  for name in ("ner_fsdp", "ner_pmap"):  # host-side metrics from per-token outputs of every device
    got, want = eight[name + "/test"], one[ref[name] + "/test"]
    assert set(got) == set(want) and want["entity_f1"] > 0, (got, want)
    for k in set(want) - {"step", "time", "split"}:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


RESUME = "train.epochs=1.25,train.log_every=1,train.checkpoint_every=10,train.keep=5,freeze_bottom_layers=1"


def restart_copy(root, src, dst):
  """A copy of run `src` as if killed right after its step-10 checkpoint."""
  shutil.copytree(root / "runs" / src, root / "runs" / dst)
  shutil.rmtree(root / "runs" / dst / "checkpoints" / "20")
  (root / "runs" / dst / "metrics.jsonl").unlink()


def test_fsdp_checkpoint_resumes_on_other_meshes(workdir):
  """Saved under 8-device FSDP; resumed on 1 device and on 4-device DP: the same loss curve."""
  ref = run_devices(8, workdir, {"fsdp8": "parallel.mesh.data=1,parallel.mesh.fsdp=8"}, RESUME)["fsdp8"]
  assert len(ref) == 20
  restart_copy(workdir, "fsdp8", "on1")
  restart_copy(workdir, "fsdp8", "on4")
  on1, on4 = side_by_side(workdir, [(1, {"on1": ""}), (4, {"on4": "parallel.mesh.data=4"})], RESUME)
  assert_close(on1["on1"], ref[10:], "resumed on 1 device")
  assert_close(on4["on4"], ref[10:], "resumed on 4-device DP")


def test_two_processes_fsdp_then_single_process_resume(workdir):
  """jax.distributed with 2 local processes x 2 CPU devices, FSDP over 4; resumed by 1 process."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [start(1, workdir, {"hosts2": f"parallel.mesh.data=1,parallel.mesh.fsdp=4,"
                                        f"parallel.coordinator=127.0.0.1:{port},parallel.num_processes=2,"
                                        f"parallel.process_id={i}"}, RESUME,
                 env={"JAXFT_TEST_CPU_DEVICES": "2"}) for i in range(2)]
  ref = finish(procs)["hosts2"]
  assert len(ref) == 20
  restart_copy(workdir, "hosts2", "hosts2_on1")
  resumed = run_devices(1, workdir, {"hosts2_on1": ""}, RESUME)["hosts2_on1"]
  assert_close(resumed[:1], ref[10:11], "next loss after a 2-process checkpoint")
  assert_close(resumed, ref[10:], "whole resumed curve")


def test_param_specs_follow_rules_and_fsdp(monkeypatch):
  import jax
  import jax.numpy as jnp

  from jaxft import parallel
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), parallel.AXES)
  params = {"bert": {"encoder": {"layer": {"0": {
      "attention": {"self": {"query": {"kernel": jnp.zeros((8, 8))}}, "output": {"dense": {"kernel": jnp.zeros((8, 8))}}},
      "intermediate": {"dense": {"kernel": jnp.zeros((8, 16))}}}}}}, "classifier": {"kernel": jnp.zeros((8, 2))}}
  from jaxft.models import bert
  specs = parallel.rules_lib.flat(parallel.param_specs(params, [["classifier/.*", [None, "tensor"]]],
                                                       bert.CONVENTIONS.tensor_parallel, mesh))
  layer = "bert/encoder/layer/0/"
  assert specs[layer + "attention/self/query/kernel"] == P(None, "tensor")
  assert specs[layer + "attention/output/dense/kernel"] == P("tensor", None)
  assert specs[layer + "intermediate/dense/kernel"] == P(None, "tensor")
  assert specs["classifier/kernel"] == P(None, "tensor")
  with pytest.raises(parallel.JaxftError, match="sharding rule 'nope/.*' matches no parameter path"):
    parallel.param_specs(params, [["nope/.*", ["tensor"]]], (), mesh)


def test_fit_adds_fsdp_on_largest_divisible_dim():
  from jaxft.parallel import _fit

  class Mesh:
    shape = {"data": 1, "fsdp": 4, "tensor": 2}
  assert _fit((None, "tensor"), (384, 1536), Mesh, "k") == P("fsdp", "tensor")
  assert _fit(("tensor", None), (30522, 384), Mesh, "emb") == P("tensor", "fsdp")  # 30522 % 2 == 0
  assert _fit(("tensor", None), (25, 32), Mesh, "emb") == P(None, "fsdp")  # 25 % 2 != 0: replicated
  assert _fit((), (6,), Mesh, "b") == P(None)


def test_builtin_rules_cover_each_family(tmp_path):
  """Column-parallel in-projections, row-parallel out-projections, on each family's own param names."""
  from test_families import checkpoint

  from jaxft import models, parallel
  from jaxft.config import ModelConfig

  class Mesh:
    shape = {"data": 1, "fsdp": 1, "tensor": 2}
  expect = {
      "llama": {"model/layers/0/self_attn/q_proj/kernel": P(None, "tensor"),
                "model/layers/0/self_attn/k_proj/kernel": P(None, "tensor"),
                "model/layers/0/self_attn/o_proj/kernel": P("tensor", None),
                "model/layers/0/mlp/gate_proj/kernel": P(None, "tensor"),
                "model/layers/0/mlp/down_proj/kernel": P("tensor", None),
                "model/embed_tokens/embedding": P("tensor", None), "lm_head/kernel": P(None, "tensor")},
      "vit": {"encoder/layer/0/attention/attention/query/kernel": P(None, "tensor"),
              "encoder/layer/0/attention/output/dense/kernel": P("tensor", None),
              "encoder/layer/0/intermediate/dense/kernel": P(None, "tensor"),
              "encoder/layer/0/output/dense/kernel": P("tensor", None),
              "embeddings/patch_embeddings/projection/kernel": P(None, None, None, None)},
      "roberta": {"encoder/layer/1/attention/self/value/kernel": P(None, "tensor"),
                  "encoder/layer/1/attention/self/value/bias": P("tensor"),
                  "encoder/layer/1/output/dense/kernel": P("tensor", None),
                  "embeddings/word_embeddings/embedding": P("tensor", None)},
  }
  for name, want in expect.items():
    model = models.load(ModelConfig(name=str(checkpoint(name, tmp_path))), seed=0, log=lambda *_: None)
    specs = parallel.rules_lib.flat(parallel.param_specs(model.params, [], model.conventions.tensor_parallel, Mesh))
    for path, spec in want.items():
      assert specs[path] == spec, (name, path, specs[path])
