import pytest

from jaxft import rules
from jaxft.config import load_config
from jaxft.errors import JaxftError
from jaxft.models import bert

CONV, HEAD = bert.CONVENTIONS, "classifier/.*"

TREE = {"bert": {"embeddings": {"word_embeddings": {"embedding": 0}, "LayerNorm": {"scale": 0, "bias": 0}},
                 "encoder": {"layer": {str(i): {"attention": {"kernel": 0, "bias": 0}} for i in range(4)}}},
        "classifier": {"kernel": 0, "bias": 0}}


def test_first_match_wins():
  out = rules.flat(rules.apply_rules(TREE, [(r".*/bias", "b"), (r"bert/.*", "bert")], default="d"))
  assert out["bert/embeddings/LayerNorm/bias"] == "b"
  assert out["bert/encoder/layer/2/attention/kernel"] == "bert"
  assert out["classifier/kernel"] == "d"


def test_rule_matching_nothing_is_an_error_naming_it():
  with pytest.raises(JaxftError, match=r"freeze rule 'bert/embedings/.\*' matches no parameter path "
                                       r"\(paths look like: bert/"):
    rules.apply_rules(TREE, [("bert/embedings/.*", "frozen")], what="freeze rule")


@pytest.mark.parametrize("overrides,frozen", [
    (("freeze_embeddings=true",), {"bert/embeddings/word_embeddings/embedding", "bert/embeddings/LayerNorm/scale",
                                   "bert/embeddings/LayerNorm/bias"}),
    (("freeze_bottom_layers=2",), {f"bert/encoder/layer/{i}/attention/{k}" for i in (0, 1) for k in ("kernel", "bias")}),
    (("train_only=[classifier/.*]",), set(rules.paths(TREE)) - {"classifier/kernel", "classifier/bias"}),
    (("freeze=[.*/bias]",), {p for p in rules.paths(TREE) if p.endswith("/bias")}),
])
def test_freeze_shorthands(overrides, frozen):
  labels = rules.flat(rules.freeze_labels(load_config(None, ("freeze_embeddings=false",) + overrides), TREE, CONV, HEAD))
  assert {p for p, l in labels.items() if l == "frozen"} == frozen


def test_freeze_more_layers_than_model_has():
  with pytest.raises(JaxftError, match="freeze_bottom_layers=5 but the model has 4 layers"):
    rules.freeze_labels(load_config(None, ("freeze_embeddings=false", "freeze_bottom_layers=5")), TREE, CONV, HEAD)


def test_no_weight_decay_on_biases_and_norms():
  mask = rules.flat(rules.weight_decay_mask(TREE, CONV))
  assert not mask["bert/embeddings/LayerNorm/scale"] and not mask["classifier/bias"]
  assert mask["classifier/kernel"] and mask["bert/embeddings/word_embeddings/embedding"]


def test_freeze_embeddings_follows_the_family():
  """Unset, it freezes a family's embedding table where it has one; a family without one (a CNN)
  trains everything, and asking for it there is an error, not a silent no-op."""
  default = rules.flat(rules.freeze_labels(load_config(None, ()), TREE, CONV, HEAD))
  assert {p for p, l in default.items() if l == "frozen"} == {p for p in default if "/embeddings/" in p}
  cnn = CONV.__class__(embeddings=None, layers=r"(?:.*/)?stage")
  tree = {"stem": {"kernel": 0}, "classifier": {"kernel": 0}}
  assert set(rules.flat(rules.freeze_labels(load_config(None, ()), tree, cnn, HEAD)).values()) == {"train"}
  with pytest.raises(JaxftError, match="freeze_embeddings=true, but this model family has no embedding table"):
    rules.freeze_labels(load_config(None, ("freeze_embeddings=true",)), tree, cnn, HEAD)
