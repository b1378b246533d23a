"""The fallback family: any transformers Flax base model (RoBERTa, DistilBERT, ELECTRA, GPT-2, ViT...)
computing with transformers' own module, and the union of the known families' path conventions."""
import inspect

from jaxft.errors import JaxftError
from jaxft.models import hf_checkpoint
from jaxft.models.base import Backbone, Conventions

CONVENTIONS = Conventions(
    embeddings=r"(.*/)?(embeddings|wte|wpe|embed_tokens)/.*",
    layers=r"(?:.*/)?(?:layer|layers|h|block|blocks)/",
    tensor_parallel=(
        # BERT / RoBERTa / ViT
        (r".*/attention/(self|attention)/(query|key|value)/kernel", (None, "tensor")),
        (r".*/attention/(self|attention)/(query|key|value)/bias", ("tensor",)),
        (r".*/attention/output/dense/kernel", ("tensor", None)),
        (r".*/intermediate/dense/kernel", (None, "tensor")),
        (r".*/intermediate/dense/bias", ("tensor",)),
        (r".*/layer/\d+/output/dense/kernel", ("tensor", None)),
        (r".*/word_embeddings/embedding", ("tensor", None)),
        # Llama family
        (r".*/self_attn/(q_proj|k_proj|v_proj)/kernel", (None, "tensor")),
        (r".*/self_attn/o_proj/kernel", ("tensor", None)),
        (r".*/mlp/(gate_proj|up_proj)/kernel", (None, "tensor")),
        (r".*/mlp/down_proj/kernel", ("tensor", None)),
        (r".*/embed_tokens/embedding", ("tensor", None)),
        (r"lm_head/kernel", (None, "tensor")),
        # GPT-2 (FlaxConv1D kernels are [out, in])
        (r".*/attn/c_attn/kernel", ("tensor", None)),
        (r".*/attn/c_attn/bias", ("tensor",)),
        (r".*/attn/c_proj/kernel", (None, "tensor")),
        (r".*/mlp/c_fc/kernel", ("tensor", None)),
        (r".*/mlp/c_fc/bias", ("tensor",)),
        (r".*/mlp/c_proj/kernel", (None, "tensor")),
        (r".*/wte/embedding", ("tensor", None)),
    ),
    lora={"qv": (r".*/(query|value|q_proj|v_proj|q_lin|v_lin)/kernel",)},
)


def load(ckpt: hf_checkpoint.Checkpoint, compute_dtype: str, remat: bool, pooler: bool) -> Backbone:
  """A Backbone computing with transformers' Flax module for the checkpoint's family."""
  model, c = ckpt.model, ckpt.config
  if remat:
    if not hasattr(model, "enable_gradient_checkpointing"):
      raise JaxftError(f"model.remat=block: {type(model).__name__} has no gradient checkpointing")
    model.enable_gradient_checkpointing()
  accepted = set(inspect.signature(model.__call__).parameters)
  inputs = [k for k in ("attention_mask", "token_type_ids") if k in accepted]

  def apply(params, batch, train=False, rng=None, state=None):
    out = model(batch["input_ids"], **{k: batch[k] for k in inputs if k in batch}, params=params,
                dropout_rng=rng, train=train and rng is not None)
    return {"hidden": out.last_hidden_state, "pooled": getattr(out, "pooler_output", None)}, state

  hidden = getattr(c, "hidden_size", None) or getattr(c, "dim", None) or getattr(c, "n_embd")
  layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", None) or getattr(c, "n_layer", 0)
  rate = getattr(c, "classifier_dropout", None)
  rate = rate if rate is not None else getattr(c, "hidden_dropout_prob", getattr(c, "dropout", 0.1))
  return Backbone(name=str(ckpt.path), key=model.base_model_prefix, params=ckpt.params, apply=apply,
                  processor=ckpt.tokenizer, config=c, conventions=CONVENTIONS,
                  save=lambda p, out, state=None: hf_checkpoint.save(ckpt, p, out), hidden_size=hidden, num_layers=layers,
                  init_scale=getattr(c, "initializer_range", 0.02), head_dropout=rate,
                  pooling=hf_checkpoint.pooling(ckpt.path))
