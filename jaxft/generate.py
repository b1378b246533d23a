"""Generation with a causal LM: batched, greedy or temperature / top-p sampling, with the KV cache.

Prompts are left-padded to a common length (a bucket, so few shapes compile), run through the model once
(prefill, writing the cache), then one token per step inside a jax.lax.while_loop until every row has
emitted EOS or `max_new_tokens` are made. The model is the experiment's apply (backbone + task head, LoRA
adapters included), the cache its model state (models/llama.py).
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import hparams, runs
from jaxft.data import batching
from jaxft.errors import JaxftError


def sample(logits_BxV, rng, temperature: float, top_p: float):
  """The next token of each row: argmax at temperature 0, else a draw from softmax(logits / T) restricted
  to the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_p < 1:
    sorted_BxV = jnp.sort(logits_BxV, -1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, -1), -1)
    # the smallest logit still inside the nucleus (the top token always is)
    cutoff_B = jnp.take_along_axis(sorted_BxV, jnp.sum(cum_BxV < top_p, -1, keepdims=True), -1)
    logits_BxV = jnp.where(logits_BxV < cutoff_B, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)


STATIC = ("apply", "new_cache", "max_new", "temperature", "top_p", "eos_id", "repeat")


def prefill(apply, params, model_state, ids_BxP, mask_BxP, new_cache, room: int, repeat: int = 1, train=False,
            rng=None):
  """One pass over left-padded prompts that writes their KV cache (with `room` slots after them): (the logits at
  each prompt's last token [B * repeat, V], the model state holding the cache, each row's prompt length), every
  prompt's row copied `repeat` times (its pass done once; GRPO's groups)."""
  B, P = ids_BxP.shape
  positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, -1) - 1, 0)
  batch = {"input_ids": ids_BxP, "attention_mask": mask_BxP, "position_ids": positions_BxP,
           "logit_positions": jnp.full((B, 1), P - 1, jnp.int32)}  # (the vocabulary's logits at one position)
  logits_Bx1xV, state = apply(params, batch, train, rng, {**(model_state or {}), "cache": new_cache(B, P + room)})
  copies = lambda x: jnp.repeat(x, repeat, 0) if x.ndim and repeat > 1 else x  # noqa: E731 (the index: a scalar)
  state = {**state, "cache": jax.tree.map(copies, state["cache"])}
  return copies(logits_Bx1xV[:, -1]), state, copies(mask_BxP.sum(-1))


def _loop(params, model_state, ids_BxP, mask_BxP, rng, *, apply, new_cache, max_new, temperature, top_p, eos_id,
          repeat=1):
  with hparams.scope(model_state):  # a sweep replica's own LoRA scale (hparams.py)
    return _tokens(params, model_state, ids_BxP, mask_BxP, rng, apply, new_cache, max_new, temperature, top_p, eos_id,
                   repeat)


def _tokens(params, model_state, ids_BxP, mask_BxP, rng, apply, new_cache, max_new, temperature, top_p, eos_id, repeat):
  last_BxV, state, lengths_B = prefill(apply, params, model_state, ids_BxP, mask_BxP, new_cache, max_new, repeat)
  B = last_BxV.shape[0]
  out_BxN = jnp.full((B, max_new), eos_id, jnp.int32)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < max_new) & ~jnp.all(done_B)

  def body(carry):
    i, logits_BxV, state, done_B, out_BxN, rng = carry
    rng, key = jax.random.split(rng)
    next_B = jnp.where(done_B, eos_id, sample(logits_BxV, key, temperature, top_p))
    out_BxN = out_BxN.at[:, i].set(next_B)
    done_B = done_B | (next_B == eos_id)
    step = {"input_ids": next_B[:, None], "attention_mask": jnp.ones((B, 1), jnp.int32),
            "position_ids": (lengths_B + i)[:, None]}
    logits, state = apply(params, step, False, None, state)
    return i + 1, logits[:, -1], state, done_B, out_BxN, rng

  carry = (0, last_BxV, state, jnp.zeros((B,), bool), out_BxN, rng)
  return jax.lax.while_loop(cond, body, carry)[4]


_whole = jax.jit(_loop, static_argnames=STATIC)  # every device runs the whole batch


def program(par, batch_size: int):
  """(the compiled generation loop, the prompts' sharding or None): on `par`'s mesh the prompts' rows are
  split over its batch axes where `batch_size` divides among them; else each device runs the whole batch."""
  step = par.compile_generate(_loop, STATIC, batch_size) if par is not None else None
  return (step, par.batch_sharding) if step is not None else (_whole, None)


def prompt_length(exp, longest: int) -> int:
  """The length prompts are left-padded to: the data's length bucket of the longest (a few shapes compile)."""
  return batching.bucket(longest, exp.buckets) if longest <= exp.buckets[-1] else longest


def generate(exp, params, model_state, prompts: list, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 32, par=None, repeat: int = 1,
             pad_to: int = 0) -> list[list[int]]:
  """The tokens generated after each prompt (a list of token ids), EOS excluded; par: the run's Parallel (its
  mesh splits each batch of prompts). repeat: that many samples of each prompt (each prompt's prefill computed
  once), prompt i's in out[i * repeat:(i + 1) * repeat]; batch_size counts prompts. pad_to: prompts are padded
  to at least this length (one shape for every batch)."""
  bb = exp.backbone
  if bb.new_cache is None:
    raise JaxftError(f"{bb.name} is not a causal LM: it has nothing to generate with")
  eos_id = exp.task.eos_id
  pad_id = exp.task.pad_id
  order = np.argsort([len(p) for p in prompts], kind="stable")
  out = [None] * (len(prompts) * repeat)
  rng = jax.random.PRNGKey(seed)
  step, rows = program(par, batch_size)
  for s in range(0, len(order), batch_size):
    idx = order[s:s + batch_size]
    longest = max(len(prompts[i]) for i in idx)
    if longest == 0:
      raise JaxftError("an empty prompt: generation needs at least one token to start from")
    P = max(prompt_length(exp, longest), pad_to)
    ids_BxP = np.full((batch_size, P), pad_id, np.int32)
    mask_BxP = np.zeros((batch_size, P), np.int32)
    for row, i in enumerate(idx):  # left-padded: every prompt ends at P - 1
      ids_BxP[row, P - len(prompts[i]):] = prompts[i]
      mask_BxP[row, P - len(prompts[i]):] = 1
    mask_BxP[len(idx):, -1] = 1  # padding rows: one token, so that nothing is fully masked
    if rows is not None:
      ids_BxP, mask_BxP = par.put_rows(ids_BxP), par.put_rows(mask_BxP)
    tokens = step(params, model_state, ids_BxP, mask_BxP, jax.random.fold_in(rng, s), apply=exp.apply,
                  new_cache=bb.new_cache, max_new=max_new_tokens, temperature=float(temperature),
                  top_p=float(top_p), eos_id=int(eos_id), repeat=repeat)
    tokens = np.asarray(tokens)
    for row, i in enumerate(idx):
      for k in range(repeat):
        t = tokens[row * repeat + k].tolist()
        out[i * repeat + k] = t[:t.index(eos_id)] if eos_id in t else t
  return out


def generation_metrics(exp, params, model_state, split: str, par=None) -> dict:
  """The task's score of answers generated (task.max_new_tokens, temperature, top_p) from the prompts of a
  split's first task.eval_examples examples."""
  g, ex = exp.cfg.task, exp.splits[split]
  n = len(ex) if g.eval_examples is None else min(g.eval_examples, len(ex))
  index = list(range(n))
  tokens = generate(exp, params, model_state, [ex.meta["prompts"][i] for i in index], g.max_new_tokens,
                    g.temperature, g.top_p, exp.cfg.seed, exp.cfg.train.eval_batch_size, par)
  texts = exp.backbone.processor.batch_decode(tokens, skip_special_tokens=True)
  return exp.task.score(texts, ex, index)


def generate_text(cfg, prompt: str, max_new_tokens: int | None = None, chat: bool = False, log=print,
                  replica: int | None = None) -> str:
  """`jaxft generate`: the continuation of `prompt` by the run's best checkpoint, or by model.name as
  loaded when the run has none (chat: the prompt as a user message through the chat template). replica:
  which replica of a seed-vectorised run (at its best checkpoint)."""
  exp, par, _, state = runs.open_state(cfg, None, "generating with", log, one_model=True, replica=replica, data=False)
  tok = exp.backbone.processor
  if chat:
    if not tok.chat_template:
      raise JaxftError(f"--chat: the tokenizer of {exp.backbone.name} has no chat template")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]  # (what tokenize=True gives, in transformers 4 and 5)
  else:
    ids = tok(prompt)["input_ids"]
  g = cfg.task
  tokens = generate(exp, state.params, state.model_state, [ids], max_new_tokens or g.max_new_tokens, g.temperature,
                    g.top_p, cfg.seed, batch_size=1, par=par)[0]
  return tok.decode(tokens, skip_special_tokens=True)
