"""Command line: `jaxft train|eval|inspect|export|bench|generate|interpolate|soup [CONFIG] [key=value ...]`,
`jaxft plot RUN_DIR...`."""
import argparse
import os
import sys
import threading

from jaxft.errors import JaxftError, Preempted


def _at_least(low: int):
  """An argparse type: an int >= low."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value
  return parse


def _parse(argv):
  parser = argparse.ArgumentParser(prog="jaxft", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_ in (("train", "fine-tune (resumes from the run dir's checkpoints)"),
                      ("eval", "the task's metrics for a checkpoint of the run (default: the best), or for the "
                               "model as loaded when the run has none"),
                      ("inspect", "print the param tree: freeze status, counts, bytes"),
                      ("export", "write the best checkpoint as a model dir (LoRA merged)"),
                      ("bench", "time the config's train step: step time, throughput, FLOPs, MFU"),
                      ("generate", "continue a prompt with the run's best checkpoint (a causal LM), or with "
                                   "model.name as loaded when the run has none"),
                      ("interpolate", "WiSE-FT: evaluate (1 - alpha) * pretrained + alpha * fine-tuned weights, "
                                      "plot the curve into the run dir"),
                      ("soup", "uniform and greedy model soups of a train.seeds run's replicas"),
                      ("plan", "compile the config's steps for a TPU topology (no TPU, no weights): memory per "
                               "chip, whether it fits, the compiler's estimated step time")):
    p = sub.add_parser(name, help=help_)
    p.add_argument("args", nargs="*", help="an optional CONFIG.yaml first, then key=value overrides")
    if name == "train":
      p.add_argument("--no-resume", action="store_true", help="start over, discarding old checkpoints")
    if name == "inspect":
      p.add_argument("--depth", type=_at_least(1), default=None, help="fold paths to this many keys")
      p.add_argument("--params", action="store_true", help="also list every param with its PartitionSpec")
    if name == "eval":
      p.add_argument("--split", choices=("train", "validation", "test"), default="test")
      p.add_argument("--step", type=_at_least(0), default=None, help="checkpoint step (default: the best)")
      p.add_argument("--json", action="store_true", help="print one JSON line of metrics")
    if name == "export":
      p.add_argument("--out", required=True, help="a new directory for the exported model")
      p.add_argument("--step", type=_at_least(0), default=None, help="checkpoint step (default: the best)")
    if name in ("export", "generate"):
      p.add_argument("--replica", type=_at_least(0), default=None, help="train.seeds runs: which replica (0 .. N-1)")
    if name == "interpolate":
      p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated mixing weights of the "
                     "fine-tuned weights (0: the pretrained backbone + probe head)")
    if name == "soup":
      p.add_argument("--out", default=None, help="also write the greedy soup as a model dir (like export)")
    if name == "generate":
      p.add_argument("--prompt", required=True, help="the text to continue")
      p.add_argument("--max-new-tokens", type=_at_least(1), default=None, help="default task.max_new_tokens")
      p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    if name == "bench":
      p.add_argument("--steps", type=_at_least(1), default=20, help="timed steps, after --warmup")
      p.add_argument("--warmup", type=_at_least(0), default=3)
      p.add_argument("--length", type=_at_least(1), default=None, help="tokens per example (default data.max_length)")
      p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
      p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    if name == "plan":
      p.add_argument("--topology", required=True, help="a TPU slice: v5e:2x2, v5p:4x4x4, v6e:16x16, v4:2x2x1, ...")
      p.add_argument("--slices", type=_at_least(1), default=1, help="slices joined by the data-centre network (the data "
                     "axis spans them)")
      p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
      p.add_argument("--search", action="store_true", help="try mesh splits, remat and micro-batch sizes; print "
                     "the fitting settings with the best estimated throughput as overrides")
      p.add_argument("--quick", action="store_true", help="each phase's largest train batch only (what --search "
                     "compares): no eval, no generation, no host pipeline")
  p = sub.add_parser("plot", help="draw runs' loss, validation metric, LR, throughput, noise scale (one PNG)")
  p.add_argument("run_dirs", nargs="+", help="run directories, overlaid")
  p.add_argument("--out", default=None, help="the PNG (default: RUN_DIR/plot.png of the first)")
  args, rest = parser.parse_known_args(argv)
  if args.command != "plot":  # overrides may also follow the options: `plan CONFIG --topology v5e:2x2 a.b=1`
    args.args += [a for a in rest if "=" in a and not a.startswith("-")]
    rest = [a for a in rest if a not in args.args]
  if rest:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  if args.command == "plot":
    return args, None
  config_path = None
  if args.args and "=" not in args.args[0]:
    config_path, args.args = args.args[0], args.args[1:]
  return args, config_path


def main(argv=None) -> int:
  args, config_path = _parse(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("USE_TORCH", "0")  # transformers would import an installed torch (1.3 s, its threads)
  from jaxft import runtime
  if not runtime.accelerator_present():  # a CPU run's step buffers (an accelerator's live in its own memory)
    runtime.tune_malloc()  # before jax starts its threads
  runtime.quiet_absent_tpu()  # libtpu installed (jaxft plan) on a machine without a TPU
  runtime.quiet_abandoned_writes()  # a failed save's library noise: the run reports the failure in one line
  from rich.console import Console
  console = Console(stderr=True)
  try:
    if args.command == "plot":
      from pathlib import Path

      from jaxft import plots
      print(plots.runs(args.run_dirs, args.out or Path(args.run_dirs[0]) / "plot.png"), flush=True)
      for run_dir in args.run_dirs:  # a sweep's metric against each swept key
        if (drawn := plots.sweep(run_dir, Path(run_dir) / "sweep.png")) is not None:
          print(drawn, flush=True)
      return 0
    from jaxft.config import load_config
    overrides = tuple(args.args) + (("resume=false",) if getattr(args, "no_resume", False) else ())
    cfg = load_config(config_path, overrides)
    if cfg.model.weights == "shapes" and args.command not in ("plan", "inspect"):
      raise JaxftError(f"model.weights=shapes builds the model without weights, for jaxft plan and inspect; "
                       f"jaxft {args.command} needs model.weights=pretrained (or random)")
    import jax

    from jaxft.assets import cache_dir
    # Compiled steps persist across runs (and resumes): a second run skips XLA compilation.
    # (Not plan's: programs compiled for compile-only TPU devices cannot be read back from the cache.)
    if args.command != "plan":
      xla_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))
      jax.config.update("jax_compilation_cache_dir", xla_cache)
      # ... every one of them: the ~100 small programs of start-up and evaluation cost 5 s to compile on CPU
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from jaxft import parallel
    if args.command != "plan":  # plan compiles for another machine's chips, in one process
      parallel.initialize(cfg.parallel)
    if args.command == "train":
      from jaxft.train import train
      train(cfg, console)
    elif args.command == "eval":
      import json

      from jaxft.evaluate import evaluate_run
      metrics = evaluate_run(cfg, args.split, args.step, console.print)
      if args.json:
        print(json.dumps({"split": args.split, **metrics}), flush=True)
      else:
        from jaxft import replicas
        print(f"{args.split} " + replicas.line(metrics), flush=True)
    elif args.command == "bench":
      from jaxft import bench
      r = bench.bench(cfg, args.steps, args.warmup, args.length, args.data, config_path or "default",
                      log=(lambda *a, **k: None) if args.json else console.print)
      if args.json:
        print(bench.to_json(r), flush=True)
      else:
        Console().print(bench.table(r))
    elif args.command == "generate":
      from jaxft.generate import generate_text
      print(generate_text(cfg, args.prompt, args.max_new_tokens, args.chat, console.print, args.replica), flush=True)
    elif args.command == "interpolate":
      from jaxft.ensembles import interpolate
      try:
        alphas = [float(a) for a in args.alphas.split(",")]
      except ValueError:
        raise JaxftError(f"--alphas {args.alphas!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
      interpolate(cfg, alphas, console.print)
    elif args.command == "soup":
      from jaxft.ensembles import soup
      soup(cfg, args.out, console.print)
    elif args.command == "plan":
      from jaxft import plan
      log = (lambda *a, **k: None) if args.json else console.print
      if args.search:
        results = plan.search(cfg, args.topology, args.slices, log)
        print(plan.search_json(results) if args.json else plan.search_summary(results, config_path), flush=True)
        return 0 if any(isinstance(r, plan.Plan) for _, r in results) else 2
      result = plan.plan(cfg, args.topology, args.slices, log, quick=args.quick)
      result.config = config_path or "default"
      if args.json:
        print(plan.to_json(result), flush=True)
      else:
        Console().print(plan.table(result))
        print(plan.summary(result), flush=True)
    elif args.command == "export":
      from jaxft.export import export
      export(cfg, args.out, args.step, console.print, args.replica)
    else:
      from jaxft.experiment import build
      from jaxft.inspect import report
      report(build(cfg, console.print), parallel.make_mesh(cfg.parallel.mesh), args.depth, args.params)
  except JaxftError as e:
    from rich.markup import escape
    console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    return 2
  except Preempted as e:
    console.print(str(e), markup=False, highlight=False, soft_wrap=True)
    return e.exit_code
  except KeyboardInterrupt:
    return 130
  return 0


def _exit_within(seconds: float, code: int) -> None:
  """Arms a daemon timer that ends the process if interpreter shutdown hangs (a library thread that
  never finishes must not keep a finished or failed run alive)."""
  def force():
    names = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    os.write(2, f"jaxft: exit blocked {seconds:.0f} s by threads {names}; exiting anyway\n".encode())
    os._exit(code)
  timer = threading.Timer(seconds, force)
  timer.daemon = True
  timer.start()


def run() -> None:
  """The `jaxft` command."""
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  if code and ("jax" not in sys.modules or sys.modules["jax"].process_count() == 1):
    os._exit(code)  # a failed or stopped run has closed what matters; skip library threads' teardown noise
  _exit_within(30, code)
  sys.exit(code)


if __name__ == "__main__":
  run()
