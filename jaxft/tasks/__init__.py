"""Tasks by name (`task.name`): a new task is a module here, with its Task and its `Config` (the task section's
keys), and one line in TASKS."""
import importlib

from jaxft.errors import JaxftError

TASKS = {  # name -> "module:Class"
    "sequence_classification": "sequence_classification:SequenceClassification",
    "regression": "regression:Regression",
    "token_classification": "token_classification:TokenClassification",
    "question_answering": "question_answering:QuestionAnswering",
    "image_classification": "image_classification:ImageClassification",
    "causal_lm": "causal_lm:CausalLM",
    "sft": "sft:SFT",
    "dpo": "dpo:DPO",
    "grpo": "grpo:GRPO",
}


def get(name: str):
  """The Task class registered as `name`."""
  if name not in TASKS:
    raise JaxftError(f"unknown task.name '{name}'; known: {', '.join(TASKS)}")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(f"jaxft.tasks.{module}"), cls)


def config_class(name: str):
  """The dataclass of task `name`'s section (its module's Config)."""
  module = TASKS[name].split(":")[0]
  return importlib.import_module(f"jaxft.tasks.{module}").Config
