"""Head-to-head, in one process on the same token inputs: PyTorch eager vs Optimum INT8 vs bertedge.

Contenders (sequence classification):
  torch-eager              transformers AutoModelForSequenceClassification, fp32, inference_mode
  optimum-int8             Optimum export + ORTQuantizer, AutoQuantizationConfig.avx512_vnni (avx2
                           without VNNI), dynamic, per-tensor: the one-flag path a user takes today
  optimum-int8-per-channel the same with per_channel=True
  openvino-nncf-int8       OpenVINO reads the fp32 ONNX file, `nncf.quantize(model_type=TRANSFORMER)`
                           on --calibration-rows calibration sentences (skipped without openvino)
  bertedge-<name>          the artifact `bertedge export` recommends (what `package` ships), run by
                           the engine the export report names (onnxruntime or openvino)
  bertedge-cascade         export's cascade row, when it built one (recommended or not): stage 1
                           answers the rows it is sure of, later stages the rest (`run_cascade`)
  bertedge-cascade-<dir>   the cascade row of each `--also-export DIR` (another export of the same
                           model, e.g. one with `--draft`), so two cascades are timed in one run

Every contender runs the same numpy feeds through its own model call (the ONNX ones through an
onnxruntime session from `bertedge.runtime.sessions`, `--threads` intra-op threads, one inter-op),
so tokenization is excluded for all alike. Shapes:
  batch 1, real sentences  each of `--batch1-rows` dev sentences at its own length, one at a time
  32 x 128                 32 rows of real text, each exactly 128 tokens (sentences run together); a cascade
                           runs 8 such batches per call, pooling their escalated rows as `predict`
                           does, and its time per batch is that call's time / 8
Accuracy and label agreement with eager fp32 come from the whole --data file run the way `predict`
runs it: length-sorted batches of 32, each padded to its longest row. Batch invariance is export's
own check (`bertedge.toolchain.export.compare.batch_invariance`), run on every contender alike:
each of `--invariance-texts` seeded dev sentences alone, in a batch with 31 others, and padded to
128 tokens; the worst |probability difference| against the text alone and the answers changed
are reported beside the speed (a contender can be fast because its answer depends on its batch).
Contenders are interleaved over --rounds rounds and the medians reported: ratios from one run
hold on a noisy machine, absolute times do not. Each contender's timings run in a fresh process
that rebuilds it (`--in-process` to time them all here): with torch's, onnxruntime's and
OpenVINO's thread pools in one process, batch-1 calls ran 1.5-3x slower, by how much depending
on which contenders were loaded. Before its batch-1 timing each contender runs every timed
sentence once, untimed.

    python benchmarks/head_to_head.py --model runs/demo/model --export runs/demo/export \\
        --data dev.tsv --text-column content --threads 2

Writes benchmarks/results/head_to_head-<UTC timestamp>.json and prints a Markdown report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bertedge.runtime.artifacts import CASCADE, inference_precision
from bertedge.runtime.data import Columns, TextExamples, load_text_classification, seeded_subset
from bertedge.runtime.features import length_sorted_batches, load_tokenizer, pad_batch, pad_id
from bertedge.runtime.meta import read_model_meta
from bertedge.runtime.sessions import make_session, session_options
from bertedge.toolchain.bench.inputs import realistic_batch

if TYPE_CHECKING:
    from bertedge.toolchain.export.report import BatchInvariance

Feeds = dict[str, np.ndarray]
Call = Callable[[], object]
EAGER = "torch-eager"
PEERS = ("optimum-int8", "optimum-int8-per-channel")
OPENVINO_PEER = "openvino-nncf-int8"
BATCH1, BIG = "1xreal", "32x128"
BIG_BATCHES = 8  # 32x128 batches a pooling contender (a cascade) runs per timed call
TARGETS = {"vs_best_peer_32x128": 1.2, "vs_best_peer_batch1": 1.1}
INVARIANCE_WIDTH = 128  # each probed text is also padded to this many tokens (export's check)
RESULTS = Path(__file__).resolve().parent / "results"
CHILD = "--time-one"  # the argument that makes this script time one contender (`child`)


@dataclass
class Contender:
    """One way to run the model: host feeds -> logits, and how it was built."""

    name: str
    run: Callable[[Feeds], np.ndarray]
    file: str
    recipe: str
    build_s: float = 0.0
    ms: dict[str, list[float]] = field(default_factory=dict)  # shape -> p50 per round
    logits: np.ndarray | None = None
    # runs several batches in one call, as `predict` does (a cascade pools their escalated rows)
    run_many: Callable[[Sequence[Feeds]], object] | None = None
    invariance: BatchInvariance | None = None  # alone vs in a batch of 32 vs padded, export's check
    spec: dict[str, Any] = field(default_factory=dict)  # how a fresh process rebuilds it (`rebuild`)


# ----------------------------------------------------------------------------- contenders


def ort_contender(name: str, path: Path, threads: int, recipe: str, build_s: float = 0.0,
                  engine: str = "onnxruntime", kind: str | None = None) -> Contender:
    session = make_session(path, threads=threads, fix="rebuild the artifact", engine=engine,
                           inference_precision=inference_precision(kind))  # a bf16 kind runs in bf16, as predict runs it
    names = [i.name for i in session.get_inputs()]

    def run(feeds: Feeds) -> np.ndarray:
        return np.asarray(session.run(None, {n: feeds[n] for n in names})[0], dtype=np.float32)

    return Contender(name, run, str(path), recipe, build_s,
                     spec={"how": "session", "name": name, "path": str(path), "engine": engine, "kind": kind})


def torch_eager(model_dir: Path, threads: int) -> Contender:
    import inspect

    import torch
    import transformers

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in inspect.signature(model.forward).parameters]

    def run(feeds: Feeds) -> np.ndarray:
        with torch.inference_mode():
            return model(**{n: torch.from_numpy(feeds[n]) for n in names}).logits.numpy()

    return Contender(EAGER, run, str(model_dir), "transformers, fp32, torch.inference_mode", time.perf_counter() - start,
                     spec={"how": "torch", "path": str(model_dir)})


def optimum_int8(model_dir: Path, work: Path, threads: int, vnni: bool) -> list[Contender]:
    """Optimum's export, then its dynamic INT8 recipe for this CPU, per-tensor and per-channel."""
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    start = time.perf_counter()
    fp32 = ORTModelForSequenceClassification.from_pretrained(model_dir, export=True,
                                                             session_options=session_options(threads))
    fp32.save_pretrained(work / "optimum")
    export_s = time.perf_counter() - start
    recipe = "avx512_vnni" if vnni else "avx2"
    out = []
    for name, per_channel in zip(PEERS, (False, True), strict=True):
        start = time.perf_counter()
        qconfig = getattr(AutoQuantizationConfig, recipe)(is_static=False, per_channel=per_channel)
        ORTQuantizer.from_pretrained(fp32).quantize(save_dir=work / name, quantization_config=qconfig)
        out.append(ort_contender(name, work / name / "model_quantized.onnx", threads,
                                 f"ORTQuantizer + AutoQuantizationConfig.{recipe}(is_static=False, "
                                 f"per_channel={per_channel})", export_s + time.perf_counter() - start))
    return out


def openvino_nncf(model_onnx: Path, calibration: Sequence[Feeds], threads: int, work: Path) -> Contender | None:
    """The OpenVINO user's path: read the ONNX file, NNCF static INT8 for transformers, compile
    (the quantized IR is saved under `work`, where each timing's fresh process compiles it again)."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    start = time.perf_counter()
    core = ov.Core()
    model = core.read_model(str(model_onnx))
    quantized = nncf.quantize(model, nncf.Dataset(list(calibration)), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration))
    xml = work / "openvino-nncf" / "model.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    recipe = f"openvino {ov.get_version().split('-')[0]} + nncf {nncf.__version__} quantize(model_type=TRANSFORMER), " \
             f"{len(calibration)} calibration sentences"
    peer = openvino_peer(xml, threads)
    peer.file, peer.recipe, peer.build_s = str(model_onnx), recipe, time.perf_counter() - start
    return peer


def openvino_peer(xml: Path, threads: int) -> Contender:
    """The NNCF IR compiled as an OpenVINO user compiles it: its defaults (bf16 where the CPU has
    it), a latency hint, `threads` threads."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.inputs]

    def run(feeds: Feeds) -> np.ndarray:
        request.infer({n: feeds[n] for n in names})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    return Contender(OPENVINO_PEER, run, str(xml), "", spec={"how": "openvino-peer", "path": str(xml)})


def bertedge_contenders(model_dir: Path, export_dir: Path | None, work: Path, threads: int,
                        args: argparse.Namespace, columns: Columns, pad: int) -> list[Contender]:
    """The artifact `bertedge export` recommends (exports now, gated on --data, without --export),
    and its cascade row when it built one and did not recommend it."""
    build_s = 0.0
    if export_dir is None:
        from bertedge.toolchain.export import ExportArgs, export

        export_dir, start = work / "bertedge-export", time.perf_counter()
        export(ExportArgs(model_dir, export_dir, eval_file=args.data, columns=columns,
                          calibration=args.calibration or args.data))
        build_s = time.perf_counter() - start
    report = json.loads((export_dir / "export-report.json").read_text(encoding="utf-8"))
    rows = {a["name"]: a for a in report["artifacts"]}
    name = report["recommended"]
    out = []
    for kind in dict.fromkeys([name, CASCADE]):
        artifact = rows.get(kind)
        if artifact is None or not artifact.get("file") or not (export_dir / artifact["file"]).is_file():
            continue
        if kind == CASCADE:
            out.append(cascade_contender(export_dir, artifact, threads, pad, recommended=kind == name))
            continue
        engine = artifact.get("engine", "onnxruntime")
        recipe = f"bertedge export, recommended '{kind}' on {engine}: {json.dumps(artifact.get('quantization'))}"
        out.append(ort_contender(f"bertedge-{kind}", export_dir / artifact["file"], threads, recipe, build_s, engine,
                                 kind))
    return out


def other_cascades(dirs: Sequence[Path], threads: int, pad: int) -> list[Contender]:
    """The cascade row of each `--also-export` folder, named after the folder."""
    out = []
    for d in dirs:
        report = json.loads((d / "export-report.json").read_text(encoding="utf-8"))
        row = next((a for a in report["artifacts"] if a["name"] == CASCADE and a.get("file")), None)
        if row is None:
            raise SystemExit(f"--also-export {d}: its export built no cascade (see its export-report.json)")
        out.append(cascade_contender(d, row, threads, pad, recommended=report["recommended"] == CASCADE,
                                     name=f"bertedge-cascade-{d.name}"))
    return out


def cascade_contender(export_dir: Path, row: dict[str, Any], threads: int, pad: int, recommended: bool,
                      name: str = "bertedge-cascade") -> Contender:
    """An export's cascade run through the runtime's `run_cascade`, one call per timed batch (its
    escalations pooled within it), as `Predictor` runs a cascade bundle."""
    from bertedge.runtime.cascade import CascadeSpec
    from bertedge.runtime.stages import open_cascade
    from bertedge.runtime.tasks import get_task

    spec = CascadeSpec.from_dict(json.loads((export_dir / row["file"]).read_text(encoding="utf-8")))
    opened = open_cascade(export_dir, spec, get_task("classification"), pad, threads=threads,
                          fix="run `bertedge export` again")

    def run(feeds: Feeds) -> np.ndarray:
        return np.asarray(opened.run_batch(dict(feeds))["logits"], dtype=np.float32)

    def run_many(batches: Sequence[Feeds]) -> object:
        return opened.run([dict(b) for b in batches], 32)

    chain = " -> ".join(f"{s.artifact} ({s.engine})" for s in spec.stages)
    recipe = (f"bertedge cascade {chain}, delta {', '.join(f'{d:.4g}' for d in spec.deltas)}; "
              f"{'recommended' if recommended else 'built, not recommended'}; passed={row.get('passed')}")
    return Contender(name, run, str(export_dir / row["file"]), recipe, run_many=run_many,
                     spec={"how": "cascade", "name": name, "path": str(export_dir), "row": row, "pad": pad})


# ----------------------------------------------------------------------------- inputs


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Any]:
    tokenizer.enable_truncation(max_length)
    try:
        return list(tokenizer.encode_batch(list(texts)))
    finally:
        tokenizer.no_truncation()


def runtime_batches(encodings: Sequence[Any], pad: int) -> tuple[list[Feeds], list[list[int]]]:
    """The whole file as `predict` batches it: length-sorted groups of 32, padded to their longest."""
    order = list(length_sorted_batches([len(e.ids) for e in encodings], 32))
    return [pad_batch([encodings[i] for i in idx], pad) for idx in order], order


# ----------------------------------------------------------------------------- measuring


def p50_ms(call: Call, warmup: int, seconds: float) -> float:
    for _ in range(warmup):
        call()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def batch1_p50_ms(c: Contender, singles: Sequence[Feeds]) -> float:
    """Median latency over real sentences, one at a time, each at its own length, after one
    untimed pass over them all (every length seen once, as in a process that has been serving:
    OpenVINO's first call at a new shape costs more than the next)."""
    for feeds in singles:
        c.run(feeds)
    times = []
    for feeds in singles:
        t = time.perf_counter()
        c.run(feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def measure(contenders: Sequence[Contender], singles: Sequence[Feeds], bigs: Sequence[Feeds], batches: Sequence[Feeds],
            order: Sequence[list[int]], rows: int, args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """Quality on the whole file, then `--rounds` interleaved rounds of timings. 32x128: one batch
    per call (`bigs[0]`), or, for a contender that runs several batches per call as `predict`
    does (a cascade pools their escalated rows), all of `bigs` per call and the time divided."""
    for c in contenders:  # quality first: it does not depend on the machine's load
        logits = np.zeros((rows, 0), dtype=np.float32)
        for feeds, idx in zip(batches, order, strict=True):
            out = c.run(feeds)
            if logits.shape[1] == 0:
                logits = np.zeros((rows, out.shape[1]), dtype=np.float32)
            logits[idx] = out
        c.logits = logits
    saved = Path(tempfile.mkdtemp(prefix="head_to_head-feeds-")) / "feeds.pkl"
    saved.write_bytes(pickle.dumps({"singles": list(singles), "bigs": list(bigs)}))
    try:
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}")
            for c in contenders:
                got = time_isolated(c, saved, args) if args.isolate else time_contender(c, singles, bigs, args)
                for shape, ms in got.items():
                    c.ms.setdefault(shape, []).append(ms)
    finally:
        shutil.rmtree(saved.parent, ignore_errors=True)


def time_contender(c: Contender, singles: Sequence[Feeds], bigs: Sequence[Feeds], args: argparse.Namespace
                   ) -> dict[str, float]:
    """Batch-1 p50 on real sentences and 32x128 p50: one batch per call (`bigs[0]`), or, for a
    contender that runs several batches per call as `predict` does (a cascade pools their
    escalated rows), all of `bigs` per call and the time divided."""
    big = (p50_ms(_bound(c, bigs[0]), args.warmup, args.duration) if c.run_many is None
           else p50_ms(_pooled(c.run_many, bigs), args.warmup, args.duration) / len(bigs))
    return {BATCH1: batch1_p50_ms(c, singles), BIG: big}


def time_isolated(c: Contender, feeds: Path, args: argparse.Namespace) -> dict[str, float]:
    """`time_contender` in a fresh process that rebuilds `c` from its spec: no other contender's
    thread pools (torch's, onnxruntime's, OpenVINO's) share the process. In one process they
    slowed each other's batch-1 calls 1.5-3x, and by how much depended on which ran before."""
    command = [sys.executable, str(Path(__file__).resolve()), CHILD, json.dumps(c.spec), str(feeds),
               str(args.threads), str(args.warmup), str(args.duration)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"timing {c.name} in its own process failed:\n{done.stderr[-2000:]}")
    return {k: float(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def rebuild(spec: dict[str, Any], threads: int) -> Contender:
    """The contender `spec` describes (`Contender.spec`), built again in this process."""
    how, path = spec["how"], Path(spec["path"])
    if how == "torch":
        return torch_eager(path, threads)
    if how == "openvino-peer":
        return openvino_peer(path, threads)
    if how == "cascade":
        return cascade_contender(path, spec["row"], threads, int(spec["pad"]), recommended=False, name=spec["name"])
    return ort_contender(spec["name"], path, threads, "", engine=spec["engine"], kind=spec["kind"])


def child(argv: list[str]) -> None:
    """`head_to_head.py --time-one SPEC FEEDS THREADS WARMUP SECONDS`: one contender's timings as
    a JSON line on stdout (see `time_isolated`)."""
    spec, feeds, threads, warmup, seconds = argv
    data = pickle.loads(Path(feeds).read_bytes())
    warnings.simplefilter("ignore")
    c = rebuild(json.loads(spec), int(threads))
    got = time_contender(c, data["singles"], data["bigs"], argparse.Namespace(warmup=int(warmup), duration=float(seconds)))
    print(json.dumps(got))


def probe_invariance(contenders: Sequence[Contender], probes: Sequence[Feeds], pool: Sequence[Feeds], pad: int,
                     width: int, args: argparse.Namespace) -> None:
    """Export's batch-invariance check on every contender, with the same texts, batch mates and
    positions for all (one seed): each probe alone, among 31 texts of `pool`, padded to `width`."""
    from bertedge.toolchain.export.compare import batch_invariance

    for c in contenders:
        c.invariance = batch_invariance(_as_outputs(c), probes, pool, pad, width, per_token=False, seed=args.seed,
                                        tol=args.invariance_tol)


def _as_outputs(c: Contender) -> Callable[[Feeds], dict[str, np.ndarray]]:
    return lambda feeds: {"logits": c.run(feeds)}


def _pooled(run_many: Callable[[Sequence[Feeds]], object], batches: Sequence[Feeds]) -> Call:
    return lambda: run_many(batches)


def _bound(c: Contender, feeds: Feeds) -> Call:
    return lambda: c.run(feeds)


def summarize(contenders: Sequence[Contender], gold: np.ndarray | None) -> dict[str, dict[str, Any]]:
    eager = next(c for c in contenders if c.name == EAGER)
    assert eager.logits is not None
    out: dict[str, dict[str, Any]] = {}
    for c in contenders:
        assert c.logits is not None
        pred = c.logits.argmax(-1)
        ms = {s: float(np.median(v)) for s, v in c.ms.items()}
        out[c.name] = {
            "file": c.file, "recipe": c.recipe, "build_s": round(c.build_s, 2),
            "accuracy": float((pred == gold).mean()) if gold is not None else None,
            "agreement_vs_fp32": float((pred == eager.logits.argmax(-1)).mean()),
            "max_abs_logit_diff_vs_fp32": float(np.abs(c.logits - eager.logits).max()),
            "batch1_p50_ms": ms[BATCH1], "batch32x128_p50_ms": ms[BIG], "batch32x128_sent_s": 32e3 / ms[BIG],
            "batch_invariance": asdict(c.invariance) if c.invariance is not None else None,
            "rounds_ms": c.ms,
        }
    return out


def targets(summary: dict[str, dict[str, Any]], best: str) -> list[dict[str, Any]]:
    """bertedge vs the best peer INT8 (the fastest one at each shape), at equal or better agreement."""
    peers = {k: v for k, v in summary.items() if k in (*PEERS, OPENVINO_PEER)}
    if not peers:
        return []
    me = summary[best]
    fastest_big = min(peers, key=lambda k: peers[k]["batch32x128_p50_ms"])
    fastest_1 = min(peers, key=lambda k: peers[k]["batch1_p50_ms"])
    best_agreement = max(v["agreement_vs_fp32"] for v in peers.values())
    checks = [
        (f"32x128 speed vs {fastest_big}", peers[fastest_big]["batch32x128_p50_ms"] / me["batch32x128_p50_ms"],
         TARGETS["vs_best_peer_32x128"]),
        (f"batch-1 speed vs {fastest_1}", peers[fastest_1]["batch1_p50_ms"] / me["batch1_p50_ms"],
         TARGETS["vs_best_peer_batch1"]),
    ]
    out = [{"target": t, "value": v, "goal": f">= {g}x", "met": v >= g} for t, v, g in checks]
    out.append({"target": "agreement vs fp32, at least the best peer's", "value": me["agreement_vs_fp32"],
                "goal": f">= {best_agreement:.4f}", "met": me["agreement_vs_fp32"] >= best_agreement})
    return out


# ----------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    s, cpu = result["settings"], result["cpu"]
    isa = ", ".join(k for k, v in cpu.items() if v is True)
    lines = [f"## Head-to-head: {s['model']}", "",
             f"{result['created']}; {cpu['model']} ({isa}); {s['threads']} threads, inter-op 1; "
             f"medians of {s['rounds']} interleaved rounds; model call only. Agreement and accuracy on "
             f"{result['data']['rows']} rows of {s['data']} in predict's batching (length-sorted 32s). "
             f"Batch-invariant: export's check on {s['invariance_texts']} of those sentences, each alone, in a "
             f"batch of 32, padded to {result['data']['invariance_width']} tokens; yes when every probability "
             f"stays within {s['invariance_tol']:g} of the text alone's and no answer changes.", "",
             "| contender | accuracy % | agreement vs fp32 % | max abs logit diff | batch-1 p50 ms (real sentences) "
             "| 32x128 p50 ms | 32x128 sent/s | batch-invariant: max abs prob diff (answers changed) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["contenders"].items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy'] * 100:.2f}"
        lines.append(f"| {name} | {acc} | {r['agreement_vs_fp32'] * 100:.2f} | {r['max_abs_logit_diff_vs_fp32']:.3f} | "
                     f"{r['batch1_p50_ms']:.2f} | {r['batch32x128_p50_ms']:.1f} | {r['batch32x128_sent_s']:.1f} | "
                     f"{invariance_text(r.get('batch_invariance'))} |")
    for name, checks in result["targets"].items():
        lines += ["", f"### targets: {name}", "", *(f"- {'MET ' if t['met'] else 'MISSED'} {t['target']}: "
                                                    f"{t['value']:.4g} (goal {t['goal']})" for t in checks)]
    lines.append("")
    return "\n".join(lines)


def invariance_text(inv: dict[str, Any] | None) -> str:
    """'yes: 3.0e-07 (0)': whether the check passed, the worst probability difference, answers changed.

    >>> invariance_text({"passed": False, "max_prob_diff": 0.0014, "answers_changed": 2}), invariance_text(None)
    ('no: 1.4e-03 (2)', '-')
    """
    if inv is None:
        return "-"
    return f"{'yes' if inv['passed'] else 'no'}: {inv['max_prob_diff']:.1e} ({inv['answers_changed']})"


# ----------------------------------------------------------------------------- main


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="fine-tuned Hugging Face folder (e.g. runs/demo/model)")
    p.add_argument("--export", type=Path, default=None, help="existing bertedge export folder (default: export now)")
    p.add_argument("--also-export", type=Path, action="append", default=[],
                   help="another export folder of the same model whose cascade is timed too (repeatable)")
    p.add_argument("--data", type=Path, required=True, help="labelled eval file, e.g. SST-2's dev.tsv (the one `export --eval` gated on)")
    p.add_argument("--calibration", type=Path, default=None, help="texts for export's calibration (default: --data)")
    p.add_argument("--text-column", default="text,sentence,content")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-rows", type=int, default=0, help="seeded subset of --data (0 = all rows)")
    p.add_argument("--batch1-rows", type=int, default=200, help="real sentences timed one at a time per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--duration", type=float, default=3.0, help="seconds of 32x128 calls per contender and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--in-process", dest="isolate", action="store_false",
                   help="time every contender in this process (default: each timing in a fresh process of its own)")
    p.add_argument("--invariance-texts", type=int, default=64,
                   help="dev sentences each contender answers alone, in a batch of 32 and padded to 128")
    p.add_argument("--invariance-tol", type=float, default=1e-5,
                   help="max |probability difference| a batch-invariant contender allows (export's default)")
    p.add_argument("--no-optimum", action="store_true", help="skip the Optimum contenders")
    p.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO + NNCF contender")
    p.add_argument("--calibration-rows", type=int, default=200,
                   help="calibration sentences for the OpenVINO peer, drawn from --calibration (default: --data)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _openvino_inputs(args: argparse.Namespace, columns: Columns, tokenizer: Any, max_length: int,
                     pad: int) -> tuple[Path, list[Feeds]]:
    """The fp32 ONNX file OpenVINO reads (bertedge's export of the same model) and its calibration rows."""
    if args.export is None:
        raise SystemExit("the OpenVINO peer reads --export's model.onnx: pass --export or --no-openvino")
    texts = load_text_classification(args.calibration or args.data, columns, require_labels=False)
    picked = seeded_subset(texts, args.calibration_rows, args.seed)
    rows = [pad_batch([e], pad) for e in encode(tokenizer, picked.texts, max_length)]
    return args.export / "model.onnx", rows


def main(argv: list[str]) -> dict[str, Any]:
    from bertedge.toolchain.export import cpu_info

    args = parse(argv)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    cpu = cpu_info()
    settings = {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items() if k != "results_dir"}  # where it was written: no machine's path
    for k, v in settings.items():
        say(f"{k:16s} {v}")
    columns = Columns(text=tuple(args.text_column.split(",")), label=tuple(args.label_column.split(",")))
    info = read_model_meta(args.model)
    examples: TextExamples = seeded_subset(
        load_text_classification(args.data, columns, label_names=list(info.labels)), args.max_rows, args.seed)
    tokenizer = load_tokenizer(args.model / "tokenizer.json")
    encodings = encode(tokenizer, examples.texts, info.max_length)
    pad = pad_id(tokenizer)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(encodings), size=min(args.batch1_rows, len(encodings)), replace=False)
    singles = [pad_batch([encodings[i]], pad) for i in pick]
    bigs = [realistic_batch(tokenizer, examples.texts, 32, 128, args.seed + i) for i in range(BIG_BATCHES)]
    batches, order = runtime_batches(encodings, pad)
    pool = [pad_batch([e], pad) for e in encodings]  # each sentence unpadded: the probes and their batch mates
    probes = [pool[int(i)] for i in np.random.default_rng(args.seed + 1).choice(
        len(pool), size=min(args.invariance_texts, len(pool)), replace=False)]
    width = min(INVARIANCE_WIDTH, info.max_length)
    with tempfile.TemporaryDirectory(prefix="head_to_head-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work = Path(tmp)
        say("building contenders ...")
        contenders = [torch_eager(args.model, args.threads)]
        if not args.no_optimum:
            contenders += optimum_int8(args.model, work, args.threads, bool(cpu.get("avx512_vnni")))
        if not args.no_openvino:
            peer = openvino_nncf(*_openvino_inputs(args, columns, tokenizer, info.max_length, pad), args.threads, work)
            contenders += [peer] if peer is not None else []
        contenders += bertedge_contenders(args.model, args.export, work, args.threads, args, columns, pad)
        contenders += other_cascades(args.also_export, args.threads, pad)
        say("batch invariance ...")
        probe_invariance(contenders, probes, pool, pad, width, args)
        measure(contenders, singles, bigs, batches, order, len(encodings), args, say)
    gold = np.asarray(examples.labels) if examples.labels is not None else None
    summary = summarize(contenders, gold)
    mine = [c.name for c in contenders if c.name.startswith("bertedge-")]
    best = mine[0]  # what export recommends (package ships it); a built cascade is measured beside it
    result = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "settings": settings,
              "cpu": cpu, "best": best, "contenders": summary, "targets": {m: targets(summary, m) for m in mine},
              "data": {"rows": len(encodings), "max_length": info.max_length, "invariance_width": width}}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"head_to_head-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    say(f"results written to {path}")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        child(sys.argv[2:])
    else:
        main(sys.argv[1:])
