"""Image classification: the backbone's pooled features -> a new Dense head.

Images (uint8 arrays of any size, grey or colour, or image files) are turned into the model's
resolution when batches are made: the evaluation view is the centred square resized; in training,
with task.augment, a random resized crop (area in task.crop_scale) and a flip, a pure function of
(seed, example, epoch) (data/images.py). Loss: cross-entropy, with task.label_smoothing in training.
Metrics: loss, accuracy (top-1), top5_accuracy, macro-F1 (classes present in the split).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft import hparams
from jaxft.config import TaskConfig
from jaxft.data import images
from jaxft.errors import JaxftError
from jaxft.tasks.base import ClassLabels, Examples, Task, column, dense_head, new_dense, require_columns
from jaxft.tasks.sequence_classification import accuracy, confusion_sums, from_confusion


@dataclasses.dataclass
class Config(TaskConfig):
  image_column: str = "image"  # a uint8 [H, W] or [H, W, C] array, or an image file's path
  label_column: str = "label"
  label_names: list[str] | None = None  # None: the source's class names, else sorted distinct train labels
  augment: bool = True  # random resized crops (scale in crop_scale) in training
  crop_scale: list[float] = dataclasses.field(default_factory=lambda: [0.35, 1.0])
  flip: bool = False  # also mirror left-right half the time (with augment): only where mirrored images are valid
  label_smoothing: float = 0.0  # cross-entropy against (1 - e) one-hot + e / classes

  def check(self):
    s = self.crop_scale
    self.require(len(s) == 2 and 0 < s[0] <= s[1] <= 1,
                 f"config key 'task.crop_scale' must be [min, max] area fractions in (0, 1], got {s}")
    self.require(0 <= self.label_smoothing < 1,
                 f"config key 'task.label_smoothing' must be in [0, 1), got {self.label_smoothing}")


class ImageClassification(Task):
  metrics = ("loss", "accuracy", "top5_accuracy", "macro_f1")
  best_metric = "accuracy"
  cacheable = True
  tokens = False

  def synthetic(self, batch: dict, rng: np.random.Generator) -> dict:
    """Random pixels."""
    batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
    return batch

  def __init__(self, cfg, backbone, source, log=print):
    super().__init__(cfg, backbone, source, log)
    t = cfg.task
    if "image" not in backbone.inputs:
      raise JaxftError(f"task.name=image_classification needs an image model; {backbone.name} reads "
                       f"{', '.join(backbone.inputs)}")
    require_columns(source.splits["train"], (t.image_column, t.label_column), "set task.image_column / task.label_column")
    self.classes = ClassLabels(cfg, source, log)
    self.label_names = self.classes.names
    self.size = backbone.processor.size

  def encode(self, records, split):
    pictures = column(records, self.cfg.task.image_column, split, (np.ndarray, str))
    return Examples(np.ones(len(records), np.int32), {"images": pictures, "labels": self.classes.index(self.label_names, records, split)},
                    {"split": split})

  def collate(self, ex, idx, length, batch_size, epoch=None, seed=None):
    t, seed = self.cfg.task, self.cfg.seed if seed is None else seed
    image_BxSxSx3 = np.zeros((batch_size, self.size, self.size, 3), np.uint8)
    for row, i in enumerate(idx):
      im = images.decode(ex.fields["images"][i], f"{ex.meta['split']} example {i}")
      image_BxSxSx3[row] = (images.eval_view(im, self.size) if epoch is None or not t.augment else
                            images.train_view(im, self.size, images.example_rng(seed, int(i), epoch), t.crop_scale,
                                                              flip=t.flip))
    labels_B = np.zeros((batch_size,), np.int32)
    labels_B[:len(idx)] = ex.fields["labels"][idx]
    weights_B = np.zeros((batch_size,), np.float32)
    weights_B[:len(idx)] = 1.0
    return {"image": image_BxSxSx3, "labels": labels_B, "weights": weights_B}

  def cannot_pack(self):
    return "task.name image_classification has no tokens to pack"

  def batch_layout(self, pack, buckets):
    t = self.cfg.task
    augment = (f"random crops of {t.crop_scale} of the area" + (", left-right flips" if t.flip else ", no flips")
               if t.augment else "no augmentation")
    return f"{self.size}x{self.size} images, {augment}"

  def init_head(self, rng):
    return new_dense(rng, self.backbone, len(self.label_names))

  def features(self, backbone_out, batch):
    return backbone_out["pooled"].astype(jnp.float32)

  def head(self, w, pooled_BxD, batch, train, rng):
    return dense_head(w, pooled_BxD, self.backbone.head_dropout, train, rng)

  def loss(self, logits_BxC, batch):
    w_B, labels_B = batch["weights"], batch["labels"]
    smoothing = hparams.value("task.label_smoothing", self.cfg.task.label_smoothing)  # (a sweep replica's own)
    targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxC.shape[-1]), smoothing)
    loss_B = optax.softmax_cross_entropy(logits_BxC.astype(jnp.float32), targets_BxC)
    loss = jnp.sum(loss_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)
    return loss, {"accuracy": accuracy(logits_BxC, labels_B, w_B)}

  def eval_sums(self, logits_BxC, batch):
    w_B, labels_B = batch["weights"], batch["labels"]
    _, top_BxK = jax.lax.top_k(logits_BxC, min(5, logits_BxC.shape[-1]))
    top5_B = jnp.any(top_BxK == labels_B[:, None], -1).astype(jnp.float32)
    return {**confusion_sums(logits_BxC, labels_B, w_B), "top5": jnp.sum(top5_B * w_B)}

  def finalize(self, sums, rows, ex):
    return {**from_confusion(sums["confusion"], sums["loss_sum"], sums["count"]),
            "top5_accuracy": float(sums["top5"] / max(float(sums["count"]), 1.0))}
