"""A generated extractive-QA set in SQuAD format, for demonstrating `task.name=question_answering` offline
(no real QA data set is reachable from this machine's registries).

  python benchmarks/make_qa_data.py OUT_DIR [--train 2000] [--test 300] [--unanswerable 0.2] [--seed 0]

Each context is 3-6 sentences stating facts about made-up people (born in a city, in a year, works as a
profession, plays an instrument) in varied word order; each question asks one fact of one person. With
--unanswerable > 0, that share of the questions asks about a fact the context does not state (an empty
answer list, SQuAD 2.0 style). Writes OUT_DIR/train.json and OUT_DIR/test.json.
"""
import argparse
import json
from pathlib import Path

import numpy as np

PEOPLE = ["Alice Moreau", "Bruno Silva", "Chen Wei", "Dara Okafor", "Emil Novak", "Fatima Haddad", "Goran Petrov",
          "Hana Sato", "Ivan Kowalski", "Jonas Berg", "Kira Ivanova", "Luca Romano", "Maya Levi", "Nils Larsen",
          "Omar Farouk", "Priya Nair", "Quentin Blake", "Rosa Diaz", "Sven Holm", "Tara Singh"]
FACTS = {  # fact -> (values, statements, question)
    "city": (["Lisbon", "Osaka", "Lagos", "Montreal", "Krakow", "Valparaiso", "Tbilisi", "Perth", "Bergen", "Quito"],
             ["{p} was born in {v}.", "{v} is the city where {p} was born.", "Born in {v}, {p} moved abroad early."],
             "Where was {p} born?"),
    "year": ([str(y) for y in range(1950, 2001)],
             ["{p} was born in the year {v}.", "In {v}, {p} was born.", "The birth year of {p} is {v}."],
             "In which year was {p} born?"),
    "job": (["architect", "nurse", "pilot", "chemist", "carpenter", "journalist", "baker", "geologist", "judge"],
            ["{p} works as a {v}.", "By profession, {p} is a {v}.", "For twenty years {p} has been a {v}."],
            "What is the profession of {p}?"),
    "instrument": (["violin", "cello", "trumpet", "piano", "harp", "flute", "drums", "oboe", "banjo"],
                   ["{p} plays the {v}.", "The {v} is the instrument {p} plays.", "On weekends {p} plays the {v}."],
                   "Which instrument does {p} play?"),
}


def example(rng, qid: str, unanswerable: float) -> dict:
  people = [str(p) for p in rng.choice(PEOPLE, size=rng.integers(2, 4), replace=False)]
  stated = []  # (person, fact, value, sentence)
  for p in people:
    for fact in rng.choice(list(FACTS), size=rng.integers(1, 3), replace=False):
      values, templates, _ = FACTS[fact]
      v = str(rng.choice(values))
      stated.append((p, str(fact), v, str(rng.choice(templates)).format(p=p, v=v)))
  order = rng.permutation(len(stated))
  context, starts = "", {}
  for i in order:
    p, fact, v, sentence = stated[i]
    at = len(context) + (1 if context else 0)
    starts[(p, fact)] = (v, at + sentence.index(v))
    context += (" " if context else "") + sentence
  if rng.random() < unanswerable:  # a fact of a person the context names, which it does not state
    missing = [(p, f) for p in people for f in FACTS if (p, f) not in starts]
    if missing:
      p, fact = missing[rng.integers(len(missing))]
      return {"id": qid, "context": context, "question": FACTS[fact][2].format(p=p),
              "answers": {"text": [], "answer_start": []}}
  p, fact = list(starts)[rng.integers(len(starts))]
  v, start = starts[(p, fact)]
  assert context[start:start + len(v)] == v
  return {"id": qid, "context": context, "question": FACTS[fact][2].format(p=p),
          "answers": {"text": [v], "answer_start": [start]}}


def squad(rows: list[dict]) -> dict:
  paragraphs = [{"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                                   "is_impossible": not r["answers"]["text"],
                                                   "answers": [{"text": t, "answer_start": s} for t, s in
                                                               zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
                for r in rows]
  return {"version": "generated", "data": [{"title": "people", "paragraphs": paragraphs}]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("out")
  ap.add_argument("--train", type=int, default=2000)
  ap.add_argument("--test", type=int, default=300)
  ap.add_argument("--unanswerable", type=float, default=0.2)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  for split, n in (("train", args.train), ("test", args.test)):
    rows = [example(rng, f"{split}-{i}", args.unanswerable) for i in range(n)]
    (out / f"{split}.json").write_text(json.dumps(squad(rows), indent=1))
    print(f"{out / (split + '.json')}: {n} questions, {sum(not r['answers']['text'] for r in rows)} unanswerable")


if __name__ == "__main__":
  main()
