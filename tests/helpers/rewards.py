"""Reward functions the GRPO tests name as task.reward=module:function (tests/helpers on PYTHONPATH)."""


def share_of_e(completion: str, answer: str, prompt: str) -> float:
  """A dense reward a tiny random model can learn: the share of the completion's characters that are 'e'."""
  return completion.count("e") / max(len(completion), 1)


def raises(completion: str, answer: str, prompt: str) -> float:
  raise ValueError("no score for this one")


def not_a_number(completion: str, answer: str, prompt: str):
  return "high"
