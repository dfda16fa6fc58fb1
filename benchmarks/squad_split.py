"""Split a SQuAD v1.1 file by article (seeded) into train and eval files, never by question.

    python benchmarks/squad_split.py dev-v1.1.json runs/squad --eval-articles 6

Writes OUT-train.json and OUT-eval.json in the original schema, so `bertedge finetune --task qa`
and `bertedge export --eval` see exactly the same held-out articles, and OUT-train-text.jsonl
(one {"question", "context"} line per training question) for `bertedge export --calibration`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("squad", type=Path)
    p.add_argument("out", type=Path, help="prefix of the two output files")
    p.add_argument("--eval-articles", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    doc = json.loads(args.squad.read_text(encoding="utf-8"))
    titles = sorted(a["title"] for a in doc["data"])
    held = set(random.Random(args.seed).sample(titles, args.eval_articles))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for part, keep in (("train", lambda t: t not in held), ("eval", lambda t: t in held)):
        articles = [a for a in doc["data"] if keep(a["title"])]
        path = Path(f"{args.out}-{part}.json")
        path.write_text(json.dumps({"data": articles, "version": doc.get("version", "1.1")}), encoding="utf-8")
        questions = sum(len(p["qas"]) for a in articles for p in a["paragraphs"])
        print(f"{path}: {len(articles)} articles, {questions} questions")
        if part == "train":
            lines = [json.dumps({"question": q["question"], "context": p["context"]})
                     for a in articles for p in a["paragraphs"] for q in p["qas"]]
            Path(f"{args.out}-train-text.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("held out:", ", ".join(sorted(held)))


if __name__ == "__main__":
    main()
