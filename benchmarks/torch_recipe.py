"""The strongest plain-PyTorch recipe for jaxft's default experiment: the `torch-dynamic` contestant.

  python benchmarks/torch_recipe.py [--epochs 1] [--json]          (needs pip install -e '.[bench-torch]')

What a PyTorch user who cares about speed writes for `jaxft train` with no arguments: the same data and
split (jaxft's source), the same tokenizer and max_length 64, all-MiniLM-L6-v2 (transformers'
BertModel, sdpa attention) with a mean-pooled Linear head, word embeddings frozen, AdamW (lr 2e-4, weight
decay 0.01 except biases and LayerNorm, as HF's Trainer does), linear warmup over 10% then linear decay,
global-norm clipping at 1.0, batch 32, dropout on, 1 epoch. Batches are grouped by length as HF's
`LengthGroupedSampler` does (random megabatches of 50 batches, sorted by length inside) and padded to
their longest example (`DataCollatorWithPadding`). Test accuracy once at the end; no validation, no
checkpoints. Prints wall time from process start, train-loop time, mean step time and test accuracy.
"""
import argparse
import json
import math
import time

T_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxft.assets import resolve  # noqa: E402
from jaxft.config import load_config  # noqa: E402
from jaxft.data import sources  # noqa: E402


def length_grouped(lengths, batch_size: int, rng) -> list[np.ndarray]:
  """HF's get_length_grouped_indices: a random permutation cut into megabatches of 50 batches, each
  sorted by length (longest first); the longest batch overall goes first. Incomplete last batch dropped."""
  perm = rng.permutation(len(lengths))
  mega = 50 * batch_size
  order = np.concatenate([sorted(perm[s:s + mega], key=lambda i: -lengths[i]) for s in range(0, len(perm), mega)])
  batches = [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
  longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
  batches[0], batches[longest] = batches[longest], batches[0]
  return batches


def pad(ids, idx, pad_id: int):
  """The examples `idx` padded to their longest: (input_ids, attention_mask) int64 tensors."""
  length = max(len(ids[i]) for i in idx)
  out = np.full((len(idx), length), pad_id, np.int64)
  mask = np.zeros((len(idx), length), np.int64)
  for r, i in enumerate(idx):
    out[r, :len(ids[i])], mask[r, :len(ids[i])] = ids[i], 1
  return torch.from_numpy(out), torch.from_numpy(mask)


class Classifier(torch.nn.Module):
  def __init__(self, path, num_labels: int):
    super().__init__()
    self.bert = transformers.BertModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="sdpa")
    self.dropout = torch.nn.Dropout(self.bert.config.hidden_dropout_prob)
    self.head = torch.nn.Linear(self.bert.config.hidden_size, num_labels)
    torch.nn.init.normal_(self.head.weight, std=0.02)
    torch.nn.init.zeros_(self.head.bias)

  def forward(self, ids, mask):
    h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].to(h.dtype)
    return self.head(self.dropout((h * m).sum(1) / m.sum(1).clamp(min=1.0)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--epochs", type=float, default=1.0)
  p.add_argument("--json", action="store_true")
  args = p.parse_args()
  torch.manual_seed(0)
  cfg = load_config(None, ())
  path = resolve(cfg.model.name)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  source = sources.load(cfg.data, log=lambda *a, **k: None)
  names = source.label_names.get("label") or sorted({str(r["label"]) for r in source.splits["train"]})

  def encode(split):
    recs = source.splits[split]
    ids = tok([r["text"] for r in recs], truncation=True, max_length=cfg.data.max_length)["input_ids"]
    labels = [int(r["label"]) if source.label_names.get("label") else names.index(str(r["label"])) for r in recs]
    return ids, np.asarray(labels)

  (train_ids, train_y), (test_ids, test_y) = encode("train"), encode("test")
  model = Classifier(path, len(names))
  model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
  decay = [p for n, p in model.named_parameters() if p.requires_grad and not ("bias" in n or "LayerNorm" in n)]
  no_decay = [p for n, p in model.named_parameters() if p.requires_grad and ("bias" in n or "LayerNorm" in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.optim.lr)
  B = cfg.train.batch_size
  lengths = np.array([len(x) for x in train_ids])
  rng = np.random.default_rng(0)
  plan = []
  while len(plan) < math.ceil(args.epochs * (len(train_ids) // B)):
    plan += length_grouped(lengths, B, rng)
  plan = plan[:math.ceil(args.epochs * (len(train_ids) // B))]
  sched = transformers.get_linear_schedule_with_warmup(opt, int(0.1 * len(plan)), len(plan))

  model.train()
  t_train, steps = time.perf_counter(), []
  for idx in plan:
    t = time.perf_counter()
    ids, mask = pad(train_ids, idx, tok.pad_token_id)
    loss = torch.nn.functional.cross_entropy(model(ids, mask), torch.from_numpy(train_y[idx]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    steps.append(time.perf_counter() - t)
  t_train = time.perf_counter() - t_train

  model.eval()
  order = np.argsort([len(x) for x in test_ids])
  correct = 0
  with torch.no_grad():
    for s in range(0, len(order), 128):
      idx = order[s:s + 128]
      correct += int((model(*pad(test_ids, idx, tok.pad_token_id)).argmax(-1).numpy() == test_y[idx]).sum())
  r = {"engine": "torch-dynamic", "torch": torch.__version__, "wall_s": time.perf_counter() - T_START,
       "train_s": t_train, "steps": len(plan), "step_ms_mean": 1000 * float(np.mean(steps)),
       "step_ms_median": 1000 * float(np.median(steps)), "test_accuracy": correct / len(order)}
  print(json.dumps(r) if args.json else "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in r.items()), flush=True)


if __name__ == "__main__":
  main()
