"""Does a text get the same answer alone, among 31 random others, and padded to 128? Through `Predictor`.

For each ONNX file (packaged on the fly from an export folder's metadata, so it runs exactly as a
bundle does), every sampled text is predicted alone, then in a batch with 31 random texts from the
same file, then beside a text that reaches 128 tokens (so it is padded to 128). Reports the worst
|probability difference| against the text alone and how many labels changed.

    python benchmarks/batch_invariance.py runs/demo/export --files model-fused.onnx,model-int8.onnx \\
        --data dev.tsv --text-column content --texts 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.runtime.bundle import build_bundle
from bertedge.runtime.data import Columns, load_text_classification
from bertedge.runtime.meta import read_model_meta


def measure(predictor: Any, texts: list[str], pool: list[str], long_text: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    worst, changed = 0.0, 0
    for text in texts:
        alone = predictor.predict([text])[0]
        mates = [pool[int(i)] for i in rng.choice(len(pool), size=31)]
        at = int(rng.integers(32))
        batched = predictor.predict([*mates[:at], text, *mates[at:]])[at]
        padded = predictor.predict([text, long_text])[0]
        for other in (batched, padded):
            changed += other["label"] != alone["label"]
            worst = max(worst, max(abs(other["probabilities"][k] - p) for k, p in alone["probabilities"].items()))
    return {"texts": len(texts), "max_prob_diff": worst, "labels_changed": changed,
            "comparisons": 2 * len(texts), "within_1e-5": worst <= 1e-5}


def main(argv: list[str]) -> dict[str, Any]:
    from bertedge.runtime.predictor import Predictor

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="bertedge export folder (metadata and tokenizer)")
    p.add_argument("--files", required=True, help="comma-separated ONNX files in (or paths outside) the folder")
    p.add_argument("--data", type=Path, required=True, help="texts to sample from")
    p.add_argument("--text-column", default="text,sentence,content")
    p.add_argument("--texts", type=int, default=200, help="texts checked per file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    meta = read_model_meta(args.export)
    pool = load_text_classification(args.data, Columns(text=tuple(args.text_column.split(","))),
                                    require_labels=False).texts
    rng = np.random.default_rng(args.seed)
    texts = [pool[int(i)] for i in rng.choice(len(pool), size=min(args.texts, len(pool)), replace=False)]
    long_text = " ".join(pool[:40])  # far past 128 tokens: truncated to max_length, the others padded to it
    results = {}
    with tempfile.TemporaryDirectory(prefix="batch_invariance-") as tmp:
        for name in args.files.split(","):
            model = Path(name) if Path(name).is_absolute() else args.export / name
            bundle = build_bundle(Path(tmp) / model.stem, model, args.export / "tokenizer.json", task=meta.task.name,
                                  labels=list(meta.labels), max_length=meta.max_length, model_type=meta.model_type)
            results[name] = measure(Predictor(bundle.root, threads=args.threads), texts, pool, long_text, args.seed)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
