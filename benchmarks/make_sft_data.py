"""The movie-review sentiment task as SFT data: prompt / response JSONL for `task.name=sft` (no instruction
data set is reachable from this machine's registries; DESIGN.md).

  python benchmarks/make_sft_data.py OUT_DIR [--pairs]

Reads the built-in `vader_movie_reviews` with the default experiment's split (data.split 80 / 10 / 10,
data.split_seed 0: the same train / validation / test examples MiniLM's classifier sees) and writes
OUT_DIR/{train,validation,test}.jsonl: {"prompt": PROMPT + review, "response": "positive" | "negative"}; with
--pairs, preference pairs for `task.name=dpo`: {"prompt", "chosen": the right word, "rejected": the other}.
"""
import json
import sys
from pathlib import Path

from jaxft.config import DataConfig
from jaxft.data import sources

PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: "


def main(out: Path, pairs: bool = False) -> None:
  source = sources.load(DataConfig(), log=lambda *_: None)
  names = source.label_names["label"]
  out.mkdir(parents=True, exist_ok=True)
  for split, records in source.splits.items():
    if pairs:
      rows = [{"prompt": PROMPT + r["text"], "chosen": names[r["label"]], "rejected": names[1 - r["label"]]}
              for r in records]
    else:
      rows = [{"prompt": PROMPT + r["text"], "response": names[r["label"]]} for r in records]
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out / f'{split}.jsonl'}: {len(rows)} examples")


if __name__ == "__main__":
  main(Path(sys.argv[1]), "--pairs" in sys.argv[2:])
