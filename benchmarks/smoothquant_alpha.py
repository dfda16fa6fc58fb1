"""SmoothQuant alpha for NNCF's static INT8 on OpenVINO: answers changed vs fp32, per calibration draw.

Static INT8's changed answers depend on which calibration texts were drawn, so one export says
little about a recipe. This script quantizes a text-classification export's fp32 graph with
`bertedge.toolchain.openvino_int8` (the export's own code) at each --alphas value for --draws
calibration draws (draw k = export's seeded draw with --seed k), runs each through the runtime's
OpenVINO session in predict's batching (length-sorted 32s), and counts answers that differ from
the fp32 graph on onnxruntime:
  eval      the --data file (what export gates on)
  held-out  --heldout-rows texts of --calibration that neither the fine-tune (--trained-rows,
            --trained-seed: `finetune --max-train-rows/--seed`) nor any calibration draw used

    python benchmarks/smoothquant_alpha.py --export runs/demo/export --data dev.tsv \\
        --calibration train.tsv --text-column sentence,content --trained-rows 24000

Writes benchmarks/results/smoothquant_alpha-<UTC timestamp>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.runtime.data import Columns, load_text_classification, seeded_indices, seeded_subset
from bertedge.runtime.features import length_sorted_batches, load_tokenizer, pad_batch, pad_id
from bertedge.runtime.meta import read_model_meta
from bertedge.runtime.sessions import make_session

RESULTS = Path(__file__).resolve().parent / "results"
Feeds = dict[str, np.ndarray]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="a `bertedge export` folder (model.onnx, tokenizer.json)")
    p.add_argument("--data", type=Path, required=True, help="eval texts (labels not needed)")
    p.add_argument("--calibration", type=Path, required=True, help="texts the draws (and the held-out set) come from")
    p.add_argument("--text-column", default="text,sentence,content")
    p.add_argument("--alphas", default="0.95,0.8", help="SmoothQuant alphas for the MatMuls, comma-separated")
    p.add_argument("--draws", type=int, default=4, help="calibration draws per alpha (seeds 0..N-1)")
    p.add_argument("--calibration-rows", type=int, default=200, help="texts per draw (export's default)")
    p.add_argument("--heldout-rows", type=int, default=4000, help="0: no held-out set")
    p.add_argument("--trained-rows", type=int, default=0, help="rows of --calibration the fine-tune used (0: all)")
    p.add_argument("--trained-seed", type=int, default=42, help="the fine-tune's --seed (its default: 42)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    return p.parse_args(argv)


def heldout_texts(texts: Sequence[str], used: set[int], rows: int, seed: int = 123) -> list[str]:
    """`rows` texts (seeded) whose indices are not in `used`."""
    free = [i for i in range(len(texts)) if i not in used]
    return [texts[free[i]] for i in seeded_indices(len(free), rows, seed)]


def used_rows(n: int, trained_rows: int, trained_seed: int, draws: int, draw_rows: int) -> set[int]:
    """Indices the fine-tune (`seeded_subset(..., trained_rows, trained_seed)`) and the draws took."""
    used = set(seeded_indices(n, trained_rows, trained_seed))
    for seed in range(draws):
        used |= set(seeded_indices(n, draw_rows, seed))
    return used


def predict_answers(session: Any, batches: Sequence[tuple[list[int], Feeds]], rows: int) -> np.ndarray:
    """Each text's label from `session` (an onnxruntime or OpenVINO session), in input order."""
    names = [i.name for i in session.get_inputs()]
    out = np.zeros(rows, dtype=np.int64)
    for idx, feeds in batches:
        out[idx] = np.asarray(session.run(None, {n: feeds[n] for n in names})[0]).argmax(-1)
    return out


def main(argv: list[str]) -> dict[str, Any]:
    from bertedge.toolchain import openvino_int8 as ov

    args = parse(argv)
    if ov.missing():
        raise SystemExit(ov.missing())
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    columns = Columns(text=tuple(args.text_column.split(",")), label=("label",))
    info = read_model_meta(args.export)
    tokenizer = load_tokenizer(args.export / "tokenizer.json")
    tokenizer.enable_truncation(info.max_length)
    pad = pad_id(tokenizer)
    source = load_text_classification(args.calibration, columns, require_labels=False)
    sets = {"eval": load_text_classification(args.data, columns, require_labels=False).texts}
    if args.heldout_rows:
        used = used_rows(len(source), args.trained_rows, args.trained_seed, args.draws, args.calibration_rows)
        sets["held-out"] = heldout_texts(source.texts, used, args.heldout_rows)
    batched = {}
    for name, texts in sets.items():
        enc = tokenizer.encode_batch(list(texts))
        batched[name] = [(idx, pad_batch([enc[i] for i in idx], pad))
                         for idx in length_sorted_batches([len(e.ids) for e in enc], 32)]
    fp32 = make_session(args.export / "model.onnx", threads=args.threads, fix="re-run bertedge export")
    ref = {k: predict_answers(fp32, b, len(sets[k])) for k, b in batched.items()}
    runs = []
    with tempfile.TemporaryDirectory(prefix="sq-alpha-") as tmp:
        for alpha in (float(a) for a in args.alphas.split(",")):
            for seed in range(args.draws):
                start = time.perf_counter()
                draw = seeded_subset(source, args.calibration_rows, seed)
                rows = [pad_batch([e], pad) for e in tokenizer.encode_batch(list(draw.texts))]
                xml = Path(tmp) / f"a{alpha}-s{seed}.xml"
                ov.quantize(args.export / "model.onnx", xml, rows, ov.Recipe(len(rows), smooth_quant=alpha))
                session = make_session(xml, threads=args.threads, engine="openvino", fix="check the OpenVINO install")
                row: dict[str, Any] = {"alpha": alpha, "draw": seed}
                for k, b in batched.items():
                    got = predict_answers(session, b, len(sets[k]))
                    row[f"{k}_changed"] = int((got != ref[k]).sum())
                row["seconds"] = round(time.perf_counter() - start, 1)
                say(json.dumps(row))
                runs.append(row)
    summary = {}
    for alpha in sorted({r["alpha"] for r in runs}, reverse=True):
        mine = [r for r in runs if r["alpha"] == alpha]
        summary[str(alpha)] = {f"{k}_changed_mean": float(np.mean([r[f"{k}_changed"] for r in mine])) for k in sets}
    result = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rows": {k: len(v) for k, v in sets.items()}, "runs": runs, "summary": summary}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"smoothquant_alpha-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"| alpha | draw | {' | '.join(f'{k} changed (of {len(v)})' for k, v in sets.items())} |")
    print("|---|---|" + "---|" * len(sets))
    for r in runs:
        print(f"| {r['alpha']:g} | {r['draw']} | {' | '.join(str(r[f'{k}_changed']) for k in sets)} |")
    for key, means in summary.items():
        print(f"| {float(key):g} | mean | {' | '.join(f'{v:.2f}' for v in means.values())} |")
    say(f"results written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
