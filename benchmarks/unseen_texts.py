"""Write texts a fine-tuned model and its export never saw: agreement data for `bertedge export`.

    python benchmarks/unseen_texts.py runs/demo/model --calibration-rows 200 --rows 4000 \\
        --out runs/demo/unseen.tsv

Reads the model's `args.json` (the training file, its seeded `--max-train-rows` subset and the
seed, as `bertedge finetune` recorded them) and writes `--rows` rows of that training file that
are neither in the fine-tune's subset nor among the rows export's calibration draws from the same
file (`--calibration-rows`, export's `--seed`). Pass the result as `bertedge export
--agreement-data`: agreement is then measured on texts used neither to train the model nor to
tune the artifact.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from bertedge.runtime.data import Columns, load_text_classification, seeded_indices


def unseen_indices(n: int, train_rows: int, train_seed: int, calibration_rows: int, export_seed: int,
                   rows: int, seed: int) -> list[int]:
    """Up to `rows` sorted row indices of `n` outside both seeded draws.

    >>> picked = unseen_indices(100, 30, 1, 10, 2, 5, 3)
    >>> len(picked), set(picked) & set(seeded_indices(100, 30, 1)), set(picked) & set(seeded_indices(100, 10, 2))
    (5, set(), set())
    """
    used = set(seeded_indices(n, train_rows, train_seed)) | set(seeded_indices(n, calibration_rows, export_seed))
    free = [i for i in range(n) if i not in used]
    return sorted(random.Random(seed).sample(free, min(rows, len(free))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a `bertedge finetune` --out folder (reads its args.json)")
    p.add_argument("--out", type=Path, required=True, help="TSV to write (sentence<TAB>label)")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--calibration-rows", type=int, default=200, help="export's --calibration-rows")
    p.add_argument("--export-seed", type=int, default=0, help="export's --seed")
    p.add_argument("--seed", type=int, default=7, help="seed of this draw")
    args = p.parse_args()
    recorded = json.loads((args.model / "args.json").read_text(encoding="utf-8"))
    train = Path(recorded["train"])
    if not train.is_absolute() and not train.is_file():
        train = args.model.parent.parent.parent / train  # recorded relative to the repo root
    cols = recorded["columns"]
    examples = load_text_classification(train, Columns(tuple(cols["text"]), tuple(cols["text_pair"]),
                                                       tuple(cols["label"])))
    picked = unseen_indices(len(examples), int(recorded["max_train_rows"]), int(recorded["seed"]),
                            args.calibration_rows, args.export_seed, args.rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["sentence", "label"])
        for i in picked:
            writer.writerow([examples.texts[i], examples.label_names[examples.labels[i]] if examples.labels else ""])
    print(f"{args.out}: {len(picked)} of {len(examples)} rows of {train}, outside the fine-tune's "
          f"{recorded['max_train_rows']}-row subset (seed {recorded['seed']}) and export's "
          f"{args.calibration_rows} calibration rows (seed {args.export_seed})")


if __name__ == "__main__":
    main()
