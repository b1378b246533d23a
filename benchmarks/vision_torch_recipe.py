"""The PyTorch recipe a vision user would run instead of configs/vision_fashion_mnist.yaml: same weights,
same images, same resolution, epochs, optimizer and schedule; a torchvision-style loop.

  python benchmarks/vision_torch_recipe.py [--config configs/vision_fashion_mnist.yaml] [--max_steps N] [--json]

  - the model: EfficientNet-Lite0 in PyTorch with the lukemelas / ml-illustrated port's module names (so the
    same efficientnet-lite0-57934424.pth loads with load_state_dict, strict), TF "SAME" padding, BatchNorm
    eps 1e-3 / momentum 0.01, ReLU6, drop connect 0.2 x block / blocks, dropout 0.2 before a new Linear head;
  - the data: jaxft's own source (the same seeded subset of Fashion-MNIST, and the same validation split),
    decoded and augmented with torchvision's algorithms re-implemented on PIL (torchvision's PyPI wheel is
    a CUDA build that does not load against the CPU torch here): RandomResizedCrop(scale=task.crop_scale,
    bicubic) + RandomHorizontalFlip for training, the centred square resized for evaluation, grey -> RGB,
    (x - 127) / 128; a DataLoader with 1 worker process (the machine has 2 cores);
  - torch.optim.AdamW(lr, weight_decay on every param, as model.parameters() gives them), linear warmup then
    cosine decay per step (LambdaLR), clip_grad_norm_(1.0), cross-entropy with task.label_smoothing,
    batch 32, drop_last; eager mode, float32.
Prints the per-step time (mean over steps 20..end, data loading included, as a user's loop sees it), the
wall time, and validation / test accuracy.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxft import assets  # noqa: E402
from jaxft.config import load_config  # noqa: E402
from jaxft.data import images, sources  # noqa: E402
from jaxft.models import efficientnet as E  # noqa: E402


class SameConv(nn.Conv2d):
  """Conv2d with TensorFlow's "SAME" padding (the odd extra pixel at the bottom / right)."""

  def forward(self, x):
    ih, iw = x.shape[-2:]
    (kh, kw), (s, _) = self.kernel_size, self.stride
    ph = max((math.ceil(ih / s) - 1) * s + kh - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + kw - iw, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def bn(c):
  return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
  def __init__(self, k, stride, e, cin, cout, drop):
    super().__init__()
    mid = cin * e
    self.e, self.residual, self.drop = e, stride == 1 and cin == cout, drop
    if e != 1:
      self._expand_conv, self._bn0 = SameConv(cin, mid, 1, bias=False), bn(mid)
    self._depthwise_conv, self._bn1 = SameConv(mid, mid, k, stride, groups=mid, bias=False), bn(mid)
    self._project_conv, self._bn2 = SameConv(mid, cout, 1, bias=False), bn(cout)

  def forward(self, x):
    h = F.relu6(self._bn0(self._expand_conv(x))) if self.e != 1 else x
    h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
    if not self.residual:
      return h
    if self.training and self.drop > 0:
      keep = torch.rand(h.shape[0], 1, 1, 1) < 1 - self.drop
      h = h * keep / (1 - self.drop)
    return h + x


class EfficientNetLite0(nn.Module):
  def __init__(self, classes: int):
    super().__init__()
    spec = E.blocks("efficientnet-lite0")
    self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2, bias=False), bn(32)
    self._blocks = nn.ModuleList(MBConv(*b, 0.2 * i / len(spec)) for i, b in enumerate(spec))
    self._conv_head, self._bn1 = SameConv(spec[-1][4], 1280, 1, bias=False), bn(1280)
    self._dropout, self._fc = nn.Dropout(0.2), nn.Linear(1280, classes)

  def forward(self, x):
    x = F.relu6(self._bn0(self._conv_stem(x)))
    for b in self._blocks:
      x = b(x)
    x = F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))
    return self._fc(self._dropout(x))


class Images(torch.utils.data.Dataset):
  def __init__(self, records, labels, size, train, crop_scale, seed):
    self.records, self.labels, self.size, self.train, self.scale = records, labels, size, train, crop_scale
    self.rng = np.random.default_rng(seed)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    im = images.decode(self.records[i]["image"], f"example {i}")
    x = (images.train_view(im, self.size, self.rng, self.scale) if self.train else images.eval_view(im, self.size))
    return torch.from_numpy((x.astype(np.float32) - E.MEAN) / E.STD).permute(2, 0, 1), int(self.labels[i])


def accuracy(model, loader):
  model.eval()
  right = total = 0
  with torch.no_grad():
    for x, y in loader:
      right += (model(x).argmax(-1) == y).sum().item()
      total += len(y)
  model.train()
  return right / total


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/vision_fashion_mnist.yaml")
  p.add_argument("--max_steps", type=int, default=None)
  p.add_argument("--json", action="store_true")
  args = p.parse_args()
  t_start = time.perf_counter()
  cfg = load_config(args.config)
  torch.manual_seed(cfg.seed)
  src = sources.load(cfg.data, log=lambda *a: None)
  names = src.label_names["label"]
  size, bsz = cfg.model.image_size, cfg.train.batch_size
  sets = {s: Images(r, [x["label"] for x in r], size, s == "train", tuple(cfg.task.crop_scale), cfg.seed)
          for s, r in src.splits.items()}
  train = torch.utils.data.DataLoader(sets["train"], bsz, shuffle=True, drop_last=True, num_workers=1,
                                      persistent_workers=True, worker_init_fn=lambda w: None)
  evals = {s: torch.utils.data.DataLoader(sets[s], cfg.train.eval_batch_size) for s in ("validation", "test")}

  model = EfficientNetLite0(len(names))
  from jaxft import formats
  weights, _ = formats.read(assets.resolve(cfg.model.name))
  state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items() if not k.startswith("_fc.")}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert set(missing) == {"_fc.weight", "_fc.bias"} and not unexpected, (missing, unexpected)

  steps = len(train) * int(cfg.train.epochs)
  if args.max_steps:
    steps = min(steps, args.max_steps)
  warm = int(cfg.optim.warmup_ratio * steps)
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: (s + 1) / max(warm, 1) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1))))
  model.train()
  step, times, t_train = 0, [], time.perf_counter()
  while step < steps:
    t0 = time.perf_counter()
    for x, y in train:
      loss = F.cross_entropy(model(x), y, label_smoothing=cfg.task.label_smoothing)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
      opt.step()
      sched.step()
      step += 1
      times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      if step % cfg.train.log_every == 0:
        print(f"step {step} loss {loss.item():.4f} step {1000 * np.mean(times[-cfg.train.log_every:]):.0f} ms", flush=True)
      if step >= steps:
        break
  train_s = time.perf_counter() - t_train
  out = {"steps": step, "step_ms": 1000 * float(np.mean(times[20:])), "train_s": train_s,
         "validation_accuracy": accuracy(model, evals["validation"]), "test_accuracy": accuracy(model, evals["test"]),
         "wall_s": time.perf_counter() - t_start, "torch": torch.__version__, "threads": torch.get_num_threads()}
  print(json.dumps(out) if args.json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in out.items()))


if __name__ == "__main__":
  main()
