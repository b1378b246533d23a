"""The replicated train step outside the training loop (benchmarks/RESULTS.md, issue 35): ms per replica-step
when the step loops over N replicas with jax.lax.map (what train.seeds=N compiles on CPU), against a host loop
that calls one jitted step per replica, updating that replica's slice of the stacked state in place. Each on
24 real training batches (median of the last 20), twice, alternating.

  python benchmarks/replica_step.py [N]    # N replicas (default 6); a single run's step: jaxft bench
"""
import functools
import sys
import time

import jax
import numpy as np

from jaxft import config, experiment, parallel, replicas

N = int(sys.argv[1]) if len(sys.argv) > 1 else 6
STEPS = 24

grabbed = {}
vectorize = replicas.vectorize_train


def grab(step, axes, chunk=None):  # the single-replica step and its replica axes, as the experiment builds them
  grabbed.update(step=step, axes=axes)
  return vectorize(step, axes, chunk)


replicas.vectorize_train = grab
cfg = config.load_config(None, (f"train.seeds={N}",))
exp = experiment.build(cfg, log=lambda *a, **k: None)
par, targets = experiment.setup(exp, log=lambda *a, **k: None)
state = par.put_state(exp.initial_state(), targets[0])
mapped = par.compile_train(exp.train_step(0, par.axis_name), targets[0])
single, tree = grabbed["step"], jax.tree.structure(state)
axes = tree.flatten_up_to(grabbed["axes"])


@functools.partial(jax.jit, donate_argnums=0)
def step_r(state, batch, r):
  """Replica r's step on its own batch, written back into the stacked state."""
  leaves = jax.tree.leaves(state)
  one = tree.unflatten([jax.lax.dynamic_index_in_dim(x, r, keepdims=False) if a is not None else x
                        for x, a in zip(leaves, axes)])
  new, m = single(one, batch)
  return tree.unflatten([jax.lax.dynamic_update_index_in_dim(x, n.astype(x.dtype), r, 0) if a is not None else x
                         for x, n, a in zip(leaves, tree.flatten_up_to(new), axes)]), m


source = exp.replicas.batches(lambda seed: exp.train_batches(par.batch_shards, parallel.process_rows, seed))
stacked = [par.put_batch(source[i], train=True) for i in range(STEPS)]
own = [[jax.device_put(source.sources[r][i]) for r in range(N)] for i in range(STEPS)]


def run(kind, state):
  times = []
  for i in range(STEPS):
    t = time.perf_counter()
    if kind == "lax.map":
      state, _ = mapped(state, stacked[i])
    else:
      for r in range(N):
        state, _ = step_r(state, own[i][r], r)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  return state, 1000 * np.median(times[4:]) / N


for kind in ("lax.map", "host loop", "lax.map", "host loop"):
  state, ms = run(kind, state)
  print(f"{N} replicas, {kind}: {ms:.0f} ms per replica-step", flush=True)
