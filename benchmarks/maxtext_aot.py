"""MaxText's train step compiled ahead of time for a TPU topology on a CPU-only host (benchmarks/plan_peers.py
runs it in a venv with maxtext[tpu]==0.2.5): its compiler figures (memory_analysis, cost_analysis, compile time)
as JSON. It does what maxtext.trainers.pre_train.train_compile.main() does (maxtext 0.2.5, non-DiLoCo path),
timing each part and keeping every CompiledMemoryStats field (train_compile prints no peak_memory_in_bytes).

Usage (train_compile's arguments):
  MT_AOT_JSON=out.json [MT_AOT_HLO=out.hlo.txt] [MT_AOT_LORA=1] python maxtext_aot.py <base.yml> key=value ...
MT_AOT_LORA=1 applies Qwix LoRA to the model, which 0.2.5's pre-training path never does (lora.enable_lora=true
alone compiles a step that trains nothing).
"""

import json
import os
import sys
import time

T0 = time.time()

import jax  # noqa: E402
from flax.core.spmd import logical_axis_rules as axis_rules  # noqa: E402
from maxtext.configs import pyconfig  # noqa: E402
from maxtext.trainers.pre_train import train  # noqa: E402
from maxtext.trainers.pre_train import train_compile as tc
from maxtext.utils import max_utils, maxtext_utils, sharding  # noqa: E402


def _install_lora_patch():
  """MT_AOT_LORA=1: make train_compile's abstract model a Qwix-LoRA model (as train_sft.py does via
  lora_utils.apply_lora_to_model), so that nnx.Optimizer(wrt=nnx.LoRAParam) and train.train_step's
  nnx.split(state.model, nnx.LoRAParam, ...) train only the adapters. maxtext 0.2.5's pre-train path
  (train.py / train_compile.py) switches `wrt` on lora.enable_lora but never applies LoRA to the model."""
  import jax.sharding as jsh
  import qwix
  from flax import nnx
  from maxtext.utils import lora_utils, model_creation_utils

  orig = model_creation_utils.get_nnx_create_model_fn

  def patched(config, mesh=None, *a, **k):
    create = orig(config, mesh, *a, **k)

    def create_with_lora():
      model = create()
      provider = lora_utils._build_lora_provider(config)  # pylint: disable=protected-access
      tokens, positions = lora_utils._prepare_dummy_inputs(mesh)  # pylint: disable=protected-access
      decoder = getattr(model, "decoder", model)
      model = qwix.apply_lora_to_model(model, provider, decoder_input_tokens=tokens,
                                       decoder_positions=positions, rngs=getattr(decoder, "rngs", None))
      n = 0
      for _, val in nnx.iter_graph(model):
        if hasattr(val, "__dict__") and "qwix_rngs" in val.__dict__:
          del val.qwix_rngs
        if isinstance(val, nnx.LoRAParam):
          n += 1
          val.set_metadata(sharding=jsh.PartitionSpec(), out_sharding=None, sharding_names=None)
      print(f"MT_AOT_LORA: {n} LoRAParam leaves")
      return model

    return create_with_lora

  model_creation_utils.get_nnx_create_model_fn = patched


def main(argv):
  if os.environ.get("MT_AOT_LORA") == "1":
    _install_lora_patch()
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  os.environ["LIBTPU_INIT_ARGS"] = (
      os.environ.get("LIBTPU_INIT_ARGS", "") + " --xla_tpu_spmd_rng_bit_generator_unsafe=true"
  )
  t_import = time.time() - T0
  config = pyconfig.initialize(argv)
  tc.validate_config(config)
  mesh = tc.get_topology_mesh(config)
  max_utils.print_system_information()

  t = time.time()
  shaped_args, shaped_kwargs, state_shardings, _, model = tc.get_shaped_inputs(mesh, config)
  params_shardings, state_shardings = sharding.maybe_update_params_sharding_with_opt(config, state_shardings)
  in_state_shardings = sharding.build_zero1_input_state_mesh_shardings(config, state_shardings, params_shardings)
  data_sharding = sharding.get_input_data_sharding(config, mesh)
  func, in_shard, out_shard, static_argnums, donate_argnums = maxtext_utils.get_functional_train_with_signature(
      train.train_step, data_sharding, in_state_shardings, model, config, params_shardings
  )
  t_shapes = time.time() - t

  # Lower and compile separately so the two are timed apart.
  import contextlib
  t = time.time()
  with jax.set_mesh(mesh), contextlib.nullcontext(), axis_rules(config.logical_axis_rules):
    jitted = jax.jit(
        func,
        in_shardings=in_shard,
        out_shardings=out_shard,
        static_argnums=static_argnums,
        donate_argnums=donate_argnums,
    )
    lowered = jitted.lower(*shaped_args, **shaped_kwargs)
  t_lower = time.time() - t
  t = time.time()
  compiled = lowered.compile(compiler_options=max_utils.parse_libtpu_flags_to_dict(config.compile_xla_flags))
  t_compile = time.time() - t

  if config.compiled_trainstep_file != "":
    tc.save_compiled(compiled, config.compiled_trainstep_file)
    print(f"Saved compiled object to {config.compiled_trainstep_file}")

  mem = compiled.memory_analysis()
  mem_fields = [
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
      "generated_code_size_in_bytes", "peak_memory_in_bytes", "peak_unpadded_heap_bytes",
      "total_allocation_bytes", "indefinite_allocations",
      "host_argument_size_in_bytes", "host_output_size_in_bytes", "host_alias_size_in_bytes",
      "host_temp_size_in_bytes", "host_generated_code_size_in_bytes",
  ]
  memd = {f: getattr(mem, f, None) for f in mem_fields}
  max_utils.print_compiled_memory_stats(mem)  # MaxText's own summary line
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  cost_top = {k: cost[k] for k in ("flops", "bytes accessed", "transcendentals", "optimal_seconds") if k in cost}

  # MaxText's analytic model-FLOPs per device per step (what it uses for MFU/TFLOP/s logging).
  total_tflops, weight_tflops, attn_tflops = maxtext_utils.calculate_tflops_training_per_device(config, log=True)

  hlo = compiled.as_text()
  n_while = hlo.count(" while(")
  if os.environ.get("MT_AOT_HLO"):
    with open(os.environ["MT_AOT_HLO"], "w") as f:
      f.write(hlo)

  n_dev = mesh.devices.size
  result = {
      "argv": argv[1:],
      "compile_topology": config.compile_topology,
      "num_devices": int(n_dev),
      "mesh_shape": dict(mesh.shape),
      "global_batch": int(config.global_batch_size_to_train_on),
      "per_device_batch_size": config.per_device_batch_size,
      "max_target_length": config.max_target_length,
      "gradient_accumulation_steps": config.gradient_accumulation_steps,
      "dtype": str(config.dtype), "weight_dtype": str(config.weight_dtype),
      "grad_dtype": str(getattr(config, "grad_dtype", None)),
      "mu_dtype": str(config.mu_dtype), "opt_type": str(config.opt_type),
      "remat_policy": config.remat_policy, "attention": config.attention,
      "scan_layers": config.scan_layers,
      "lora": str(config.lora) if os.environ.get("MT_AOT_LORA") == "1" else None,
      "timings_s": {"import": t_import, "shapes": t_shapes, "lower": t_lower, "compile": t_compile,
                    "total": time.time() - T0},
      "memory_analysis": memd,
      "memory_total_maxtext_formula_bytes": mem.output_size_in_bytes + mem.temp_size_in_bytes
      + mem.argument_size_in_bytes - mem.alias_size_in_bytes,
      "cost_analysis": cost_top,
      "maxtext_analytic_tflops_per_device_per_step": {
          "total": total_tflops, "learnable_weight": weight_tflops, "attention": attn_tflops},
      "hlo_while_loops": n_while,
  }
  print("MT_AOT_RESULT " + json.dumps(result, default=str))
  if os.environ.get("MT_AOT_JSON"):
    with open(os.environ["MT_AOT_JSON"], "w") as f:
      json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
  main(sys.argv)
