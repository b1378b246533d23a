"""Supervised fine-tuning (SFT) of a causal LM on prompt / response pairs or chat conversations; the loss is
on response tokens only.

Records hold task.prompt_column and task.response_column, or task.messages_column: a list of
{"role", "content"} messages ending with an assistant turn. With a chat template (the tokenizer's), a pair
is the conversation [user: prompt, assistant: response]; every assistant turn is trained, together with the
template's end-of-turn tokens, and nothing else (system prompt, user turns, role headers). Without one, the
text is prompt + response + EOS, and the response and EOS are trained. Which tokens are trained is read from
the rendered text by character offsets, so tokens merged across the prompt / response boundary stay right.

Examples longer than data.max_length are cut there (counted in the log); an example with no trained token
left, or a template that renders no response, is an error naming the example. Evaluation adds the
generated answer's exact match (SQuAD-style: whitespace and surrounding punctuation stripped, case-folded) to the loss, perplexity and accuracy of
the response tokens, generating greedily from each prompt (task.eval_examples of them, up to
task.max_new_tokens).
"""
import dataclasses
import string

import numpy as np

from jaxft.config import TaskConfig
from jaxft.errors import JaxftError
from jaxft.tasks.base import Examples, where
from jaxft.tasks.causal_lm import CausalLM, Generation, require_targets


def is_conversation(msgs) -> bool:
  """Whether `msgs` is a list of {role: system | user | assistant, content: text} ending with an assistant turn."""
  ok = isinstance(msgs, list) and bool(msgs) and all(
      isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
      for m in msgs)
  return ok and msgs[-1]["role"] == "assistant"


def normalise_answer(text: str) -> str:
  """SQuAD-style: whitespace collapsed, surrounding punctuation stripped, case-folded."""
  return " ".join(text.split()).strip(string.punctuation + " ").casefold()


@dataclasses.dataclass
class Config(Generation, TaskConfig):
  """Prompt / response pairs, or chat messages [{role, content}, ...]; the loss is on the responses only."""
  prompt_column: str = "prompt"
  response_column: str = "response"
  messages_column: str = "messages"
  eval_examples: int | None = 200  # generate answers for this many examples of each evaluated split; None: all

  def check(self) -> None:
    self.check_generation()
    self.require(self.eval_examples is None or self.eval_examples > 0,
                 f"config key 'task.eval_examples' must be > 0 (or null: all), got {self.eval_examples}")


class SFT(CausalLM):
  metrics = ("loss", "perplexity", "token_accuracy", "exact_match")
  best_metric = "loss"
  generates = True

  def _conversations(self, records, split) -> list[list[dict]]:
    t = self.cfg.task
    convs = []
    for i, r in enumerate(records):
      if t.messages_column in r:
        msgs = r[t.messages_column]
        if not is_conversation(msgs):
          raise JaxftError(f"{where(records, i, split)}: '{t.messages_column}' must be a list of {{role: system | "
                           f"user | assistant, content: text}} ending with an assistant message")
        convs.append(msgs)
      elif t.prompt_column in r and t.response_column in r:
        prompt, response = r[t.prompt_column], r[t.response_column]
        if not (isinstance(prompt, str) and isinstance(response, str)):
          raise JaxftError(f"{where(records, i, split)}: '{t.prompt_column}' and '{t.response_column}' must be text")
        convs.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
      else:
        raise JaxftError(f"{where(records, i, split)}: no '{t.messages_column}' and no '{t.prompt_column}' / "
                         f"'{t.response_column}' (keys: {', '.join(map(str, r))}); set task.messages_column or "
                         f"task.prompt_column / task.response_column")
    return convs

  def _render(self, msgs, origin) -> tuple[str, list[tuple[int, int]], int]:
    """(the text, the character spans to train, where the last response starts) of a conversation."""
    tok = self.backbone.processor
    if not tok.chat_template:
      if [m["role"] for m in msgs] != ["user", "assistant"]:
        raise JaxftError(f"{origin}: a conversation of {len(msgs)} messages needs a chat template, and the "
                         f"tokenizer of {self.backbone.name} has none")
      prompt, text = msgs[0]["content"], msgs[0]["content"] + msgs[1]["content"]
      return text, [(len(prompt), len(text) + 1)], len(prompt)  # + 1: the EOS appended after the text
    render = lambda m, gen: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    text = render(msgs, False)
    spans = []
    for i, m in enumerate(msgs):
      if m["role"] != "assistant":
        continue
      before, upto = render(msgs[:i], True), render(msgs[:i + 1], False)
      if not (upto.startswith(before) and text.startswith(upto)):
        raise JaxftError(f"{origin}: the chat template does not render message {i} as a continuation of the "
                         f"conversation before it, so its response tokens cannot be told apart")
      if len(upto) == len(before):
        raise JaxftError(f"{origin}: the chat template renders assistant message {i} as nothing")
      spans.append((len(before), len(upto)))
    return text, spans, spans[-1][0]

  def encode(self, records, split):
    d = self.cfg.data
    convs = self._conversations(records, split)
    ids, targets, prompts, cut = self.tokenized(convs, [where(records, i, split) for i in range(len(convs))],
                                                d.max_length)
    answers = [c[-1]["content"] for c in convs]
    ex = Examples(np.array([len(x) for x in ids]), {"ids": ids, "targets": targets},
                  meta={"prompts": prompts, "answers": answers})
    require_targets(ex, records, split, f"its response starts past data.max_length={d.max_length}, or the "
                                        "chat template renders it as nothing")
    trained = sum(int(t.sum()) for t in targets)
    self.log(f"{split}: {len(ids):,} conversations, {trained:,} of {sum(len(x) for x in ids):,} tokens trained "
             f"(responses)" + (f"; {cut} cut at data.max_length={d.max_length}" if cut else ""))
    return ex

  def tokenized(self, convs, origins, max_length: int, last_turn: bool = False):
    """(ids, trained-token marks, prompts, how many were cut) of conversations, each cut at max_length
    tokens: every assistant turn trained, or only the last (last_turn); a prompt is the tokens before the
    last response."""
    tok = self.backbone.processor
    rendered = [self._render(c, origin) for c, origin in zip(convs, origins, strict=True)]
    enc = tok([r[0] for r in rendered], add_special_tokens=not tok.chat_template, return_offsets_mapping=True)
    ids, targets, prompts, cut = [], [], [], 0
    for i, (text, spans, answer_at) in enumerate(rendered):
      x = list(enc["input_ids"][i])
      starts = [s for s, _ in enc["offset_mapping"][i]]
      if not tok.chat_template:  # the EOS closes the response
        x, starts = x + [self.eos_id], starts + [len(text)]
      starts_L = np.asarray(starts)
      trained_L = np.zeros(len(x), np.int32)
      for a, b in spans[-1:] if last_turn else spans:
        trained_L |= ((starts_L >= a) & (starts_L < b)).astype(np.int32)
      first = int(np.argmax((starts_L >= answer_at) & (trained_L > 0))) if trained_L.any() else len(x)
      prompts.append(np.asarray(x[:first], np.int32))
      cut += len(x) > max_length
      ids.append(np.asarray(x[:max_length], np.int32))
      targets.append(trained_L[:max_length])
    return ids, targets, prompts, cut

  def batch_layout(self, pack, buckets):
    return f"packed into rows of {self.cfg.data.max_length}" if pack else f"length buckets {buckets}"

  def score(self, generated: list[str], ex: Examples, index) -> dict:
    """Exact match of generated answers against the references of examples `index`."""
    hits = [normalise_answer(g) == normalise_answer(ex.meta["answers"][i]) for g, i in zip(generated, index)]
    return {"exact_match": float(np.mean(hits)) if hits else float("nan")}
