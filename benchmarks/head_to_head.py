"""Head-to-head, in one process on the same token inputs: PyTorch eager vs the Optimum path vs bertedge.

Contenders:
  (a) torch-eager     transformers AutoModelForSequenceClassification, fp32, inference_mode
  (b) optimum-fp32    ORTModelForSequenceClassification.from_pretrained(model, export=True)
      optimum-int8    + ORTQuantizer with AutoQuantizationConfig.avx2 (avx512_vnni when the CPU
                      has VNNI), dynamic, per-tensor: the path a user takes today
  (c) bertedge-<name> the artifact `bertedge export` recommends (validated against its accuracy gate)

Every contender is timed on the same numpy feeds through its own model call (the Optimum models
through their onnxruntime session), so tokenization is excluded for all alike. Shapes: batch 1 x
128 and batch 32 x 128 (real dev sentences cut to exactly 128 tokens), plus a length-bucketed pass
over the whole --data file (batches of 32 sorted by length, padded to their longest), which also
gives accuracy and label agreement with fp32 eager. Contenders are interleaved over --rounds
rounds and the medians are reported: ratios from one run hold on a noisy machine, absolute times
do not.

    python benchmarks/head_to_head.py --model runs/demo/model --data /work/shared/data/sst2/dev.tsv \\
        --text-column content --threads 2

Writes benchmarks/results/head_to_head-<UTC timestamp>.json and prints a Markdown report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.build import bench as b
from bertedge.runtime.data import Columns, load_text_classification, seeded_subset
from bertedge.runtime.meta import read_model_meta

SHAPES = ((1, 128), (32, 128))
EAGER, OPTIMUM = "torch-eager", "optimum-int8"
TARGETS = {"vs_eager": 3.0, "vs_optimum": 1.2, "max_accuracy_drop_points": 0.5}
ARTIFACT_BACKEND = {"fp32": "onnx", "fused": "onnx-fused", "int8": "int8", "int8-static": "int8-static"}
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Contender:
    """One way to run the model, with what it is built from and how long building took."""

    name: str
    loaded: b.Loaded
    file: str
    size_mb: float
    recipe: str
    build_s: float = 0.0
    shapes: dict[str, list[b.LatencyStats]] = field(default_factory=dict)  # "1x128" -> one per round
    bucketed_s: list[float] = field(default_factory=list)
    logits: np.ndarray | None = None


# ----------------------------------------------------------------------------- contenders


def ort_loaded(session: Any, load_s: float, path: Path) -> b.Loaded:
    """Wrap any onnxruntime session (Optimum's included) as a bench backend on host feeds."""
    names = [i.name for i in session.get_inputs()]

    def run(feeds: b.Feeds) -> np.ndarray:
        return np.asarray(session.run(None, {n: feeds[n] for n in names})[0], dtype=np.float32)

    def prepare(feeds: b.Feeds) -> b.Call:
        selected = {n: feeds[n] for n in names}
        return lambda: session.run(None, selected)

    threads = int(session.get_session_options().intra_op_num_threads)
    return b.Loaded(run, prepare, list(session.get_providers()), threads, "session options", load_s, path, keep=session)


def torch_eager(model_dir: Path, threads: int) -> Contender:
    loaded = b.load_torch(b.resolve_source(model_dir), b.BACKEND_BY_NAME["torch"], threads)
    weights = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin")]
    return Contender(EAGER, loaded, str(model_dir), sum(p.stat().st_size for p in weights) / 1e6,
                     "transformers AutoModelForSequenceClassification, fp32, torch.inference_mode", loaded.load_s)


def optimum_pair(model_dir: Path, work: Path, threads: int, vnni: bool) -> list[Contender]:
    """Optimum export (fp32) and its dynamic INT8 quantization, as the Optimum docs show."""
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    options = b.session_options(threads)
    start = time.perf_counter()
    fp32 = ORTModelForSequenceClassification.from_pretrained(model_dir, export=True, session_options=options)
    fp32.save_pretrained(work / "optimum")
    export_s = time.perf_counter() - start
    recipe = "avx512_vnni" if vnni else "avx2"
    qconfig = getattr(AutoQuantizationConfig, recipe)(is_static=False, per_channel=False)
    start = time.perf_counter()
    ORTQuantizer.from_pretrained(fp32).quantize(save_dir=work / "optimum-int8", quantization_config=qconfig)
    int8_path = work / "optimum-int8" / "model_quantized.onnx"
    int8 = ORTModelForSequenceClassification.from_pretrained(work / "optimum-int8", file_name=int8_path.name,
                                                             session_options=options)
    quantize_s = time.perf_counter() - start
    fp32_path = work / "optimum" / "model.onnx"
    return [
        Contender("optimum-fp32", ort_loaded(fp32.session, export_s, fp32_path), str(fp32_path),
                  fp32_path.stat().st_size / 1e6, "ORTModelForSequenceClassification.from_pretrained(export=True)", export_s),
        Contender(OPTIMUM, ort_loaded(int8.session, quantize_s, int8_path), str(int8_path),
                  int8_path.stat().st_size / 1e6,
                  f"ORTQuantizer + AutoQuantizationConfig.{recipe}(is_static=False, per_channel=False)", quantize_s),
    ]


def bertedge_best(model_dir: Path, export_dir: Path | None, work: Path, threads: int, data: Path,
                  columns: Columns) -> Contender:
    """bertedge's recommended artifact; runs `bertedge export` (gated on --data) when no --export is given."""
    build_s = 0.0
    if export_dir is None:
        from bertedge.build.export import ExportArgs, export

        export_dir, start = work / "bertedge-export", time.perf_counter()
        export(ExportArgs(model_dir, export_dir, eval_file=data, columns=columns))
        build_s = time.perf_counter() - start
    report = json.loads((export_dir / "export-report.json").read_text(encoding="utf-8"))
    name = report["recommended"]
    artifact = next(a for a in report["artifacts"] if a["name"] == name)
    loaded = b.load_ort(b.resolve_source(export_dir), b.BACKEND_BY_NAME[ARTIFACT_BACKEND[name]], threads)
    assert loaded.file is not None
    recipe = f"bertedge export, recommended artifact '{name}': {json.dumps(artifact.get('quantization'))}"
    return Contender(f"bertedge-{name}", loaded, str(loaded.file), loaded.file.stat().st_size / 1e6, recipe, build_s)


# ----------------------------------------------------------------------------- measuring


def measure(contenders: list[Contender], inputs: dict[str, b.Feeds], data: b.DataSet, args: argparse.Namespace,
            say: Callable[[str], None]) -> None:
    """Interleave contenders round by round: each shape, then the length-bucketed pass."""
    for round_ in range(args.rounds):
        say(f"round {round_ + 1}/{args.rounds}")
        for shape, feeds in inputs.items():
            batch, seq = (int(x) for x in shape.split("x"))
            for c in contenders:
                latencies = b.time_calls(c.loaded.prepare(feeds), args.warmup, args.runs, args.duration)
                c.shapes.setdefault(shape, []).append(b.latency_stats(latencies, batch, seq))
        for c in contenders:
            logits, seconds = b.data_logits(c.loaded, data)
            c.bucketed_s.append(seconds)
            c.logits = logits if c.logits is None else c.logits


def summarize(contenders: list[Contender], data: b.DataSet) -> dict[str, dict[str, Any]]:
    """Medians over rounds, accuracy and agreement vs fp32 eager, ratios vs eager and vs Optimum INT8."""
    eager = next(c for c in contenders if c.name == EAGER)
    assert eager.logits is not None
    gold = np.asarray(data.examples.labels) if data.examples.labels is not None else None
    out: dict[str, dict[str, Any]] = {}
    for c in contenders:
        assert c.logits is not None
        pred = c.logits.argmax(-1)
        out[c.name] = {
            "file": c.file, "size_mb": c.size_mb, "recipe": c.recipe, "build_s": c.build_s,
            "providers": c.loaded.providers, "threads": c.loaded.threads,
            "accuracy": float((pred == gold).mean()) if gold is not None else None,
            "agreement_vs_fp32": float((pred == eager.logits.argmax(-1)).mean()),
            "max_abs_logit_diff_vs_fp32": float(np.abs(c.logits - eager.logits).max()),
            "shapes": {s: {"p50_ms": float(np.median([x.p50_ms for x in st])),
                           "p50_sequences_per_s": int(s.split("x")[0]) * 1e3 / float(np.median([x.p50_ms for x in st])),
                           "p90_ms": float(np.median([x.p90_ms for x in st])),
                           "sequences_per_s": float(np.median([x.sequences_per_s for x in st])),
                           "rounds": [asdict(x) for x in st]} for s, st in c.shapes.items()},
            "bucketed": {"sequences_per_s": len(data.order) / float(np.median(c.bucketed_s)),
                         "seconds_rounds": c.bucketed_s, "rows": len(data.order), "batch_size": len(data.batches[0]["input_ids"])},
        }
    for r in out.values():
        # Shape ratios use median p50 latency (same batch, so it is the throughput ratio at p50):
        # a mean is pulled around by the other load on a shared machine, the median is not.
        r["ratios"] = {ref_key: {s: out[ref]["shapes"][s]["p50_ms"] / r["shapes"][s]["p50_ms"] for s in r["shapes"]}
                       | {"bucketed": r["bucketed"]["sequences_per_s"] / out[ref]["bucketed"]["sequences_per_s"]}
                       for ref_key, ref in (("vs_eager", EAGER), ("vs_optimum", OPTIMUM)) if ref in out}
    return out


def targets(summary: dict[str, dict[str, Any]], best: str) -> list[dict[str, Any]]:
    """The issue's targets for bertedge's best artifact, each with its measured value and verdict."""
    r, eager = summary[best], summary[EAGER]
    checks = []
    for shape in [f"{bs}x{sl}" for bs, sl in SHAPES]:
        for key in ("vs_eager", "vs_optimum"):
            value = r["ratios"][key][shape]
            checks.append({"target": f"{best} {key.replace('_', ' ')} throughput at {shape}", "value": value,
                           "goal": f">= {TARGETS[key]}x", "met": value >= TARGETS[key]})
    if r["accuracy"] is not None and eager["accuracy"] is not None:
        drop = (eager["accuracy"] - r["accuracy"]) * 100
        checks.append({"target": f"{best} accuracy drop vs fp32 eager (points)", "value": drop,
                       "goal": f"<= {TARGETS['max_accuracy_drop_points']}", "met": drop <= TARGETS["max_accuracy_drop_points"]})
    return checks


# ----------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    summary, env = result["contenders"], result["environment"]
    cpu = env["cpu"]
    isa = ", ".join(k for k, v in cpu["isa"].items() if v)
    lines = [f"## Head-to-head: {result['settings']['model']}", "",
             f"{result['created']}; {cpu['model']}, {cpu['usable_cores']} usable cores, ISA: {isa}; "
             f"{result['settings']['threads']} threads, inter-op 1; medians of {result['settings']['rounds']} interleaved rounds; "
             "model call only (tokenization excluded for every contender; Optimum timed through its onnxruntime session). "
             "Shape ratios are of p50 latency; the bucketed ratios of total time over the file.", ""]
    for shape in [f"{bs}x{sl}" for bs, sl in SHAPES]:
        lines += [f"### batch {shape.replace('x', ' x seq ')}", "",
                  "| contender | p50 ms | p90 ms | sent/s at p50 | sent/s (mean) | x eager | x Optimum INT8 |", "|---|---|---|---|---|---|---|"]
        for name, r in summary.items():
            s, ratios = r["shapes"][shape], r["ratios"]
            lines.append(f"| {name} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p50_sequences_per_s']:.1f} | "
                         f"{s['sequences_per_s']:.1f} | "
                         f"{ratios.get('vs_eager', {}).get(shape, float('nan')):.2f} | "
                         f"{ratios.get('vs_optimum', {}).get(shape, float('nan')):.2f} |")
        lines.append("")
    lines += ["### whole --data file, length-bucketed batches of 32; accuracy", "",
              "| contender | MB | sent/s | x eager | x Optimum INT8 | accuracy % | agreement vs fp32 % | max abs logit diff |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy'] * 100:.2f}"
        lines.append(f"| {name} | {r['size_mb']:.1f} | {r['bucketed']['sequences_per_s']:.1f} | "
                     f"{r['ratios'].get('vs_eager', {}).get('bucketed', float('nan')):.2f} | "
                     f"{r['ratios'].get('vs_optimum', {}).get('bucketed', float('nan')):.2f} | {acc} | "
                     f"{r['agreement_vs_fp32'] * 100:.1f} | {r['max_abs_logit_diff_vs_fp32']:.3f} |")
    lines += ["", "### targets", "", *(f"- {'MET ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.2f} (goal {t['goal']})"
                                       for t in result["targets"]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="fine-tuned Hugging Face folder (e.g. runs/demo/model)")
    p.add_argument("--export", type=Path, default=None, help="existing bertedge export folder (default: export now)")
    p.add_argument("--data", type=Path, required=True, help="labelled eval file (e.g. /work/shared/data/sst2/dev.tsv)")
    p.add_argument("--text-column", default="text,sentence,content")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-rows", type=int, default=0, help="seeded subset of --data (0 = all rows)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=0, help="timed runs per shape and round (default: --duration)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds per shape and round (default 3 without --runs)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.runs and not args.duration:
        args.duration = 3.0
    return args


def main(argv: list[str]) -> dict[str, Any]:
    args = parse(argv)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    env = b.environment()
    vnni = bool(env["cpu"]["isa"]["avx512_vnni"])
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {
        "shapes": [f"{bs}x{sl}" for bs, sl in SHAPES], "inter_op_threads": 1,
        "optimum_quantization": "avx512_vnni" if vnni else "avx2",
        "timed": "model call only on identical numpy feeds; tokenization excluded for every contender; "
                 "Optimum models through their onnxruntime session"}
    for k, v in settings.items():
        say(f"{k:22s} {v}")
    columns = Columns(text=tuple(args.text_column.split(",")), label=tuple(args.label_column.split(",")))
    info = read_model_meta(args.model)
    examples = seeded_subset(load_text_classification(args.data, columns, label_names=list(info.labels)),
                             args.max_rows, args.seed)
    tokenizer = b.load_plain_tokenizer(args.model / "tokenizer.json")
    inputs = {f"{bs}x{sl}": b.realistic_batch(tokenizer, examples.texts, bs, sl, seed=args.seed + bs) for bs, sl in SHAPES}
    data = b.tokenize_dataset(tokenizer, examples, info.max_length, 32)
    with tempfile.TemporaryDirectory(prefix="head_to_head-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work = Path(tmp)
        say("building contenders: eager, Optimum export + quantize, bertedge export ...")
        contenders = [torch_eager(args.model, args.threads), *optimum_pair(args.model, work, args.threads, vnni),
                      bertedge_best(args.model, args.export, work, args.threads, args.data, columns)]
        measure(contenders, inputs, data, args, say)
    summary = summarize(contenders, data)
    best = contenders[-1].name
    result = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "settings": settings,
              "environment": env, "best": best, "contenders": summary, "targets": targets(summary, best),
              "data": {"rows": len(examples), "tokens": data.tokens, "truncated": data.truncated,
                       "max_length": info.max_length}}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"head_to_head-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    say(f"results written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
