"""Cold start and peak RSS, measured in a fresh process per backend that imports only what it needs.

The child runs `python -m bertedge.toolchain.bench _cold-start SPEC` (see `__main__.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.runtime.artifacts import inference_precision
from bertedge.runtime.tasks import get_task
from bertedge.toolchain.bench.backends import provider_list
from bertedge.toolchain.bench.environment import gpu_memory_mb
from bertedge.toolchain.bench.inputs import Source
from bertedge.toolchain.bench.results import ColdStart
from bertedge.toolchain.bench.spec import Backend

# ----------------------------------------------------------------------------- cold start

PREDICTOR = "predictor"  # a spec's engine for any bundle loaded by `Predictor` (`predictor_spec`)


def cold_start_spec(backend: Backend, source: Source, threads: int, text: str) -> dict[str, Any]:
    """What the fresh process needs to load this backend and predict `text` once."""
    file = source.file_for(backend)
    return {"engine": backend.engine, "file": str(file) if file else None, "torch_dir": str(source.torch_dir),
            "auto_class": get_task(source.task).hf_auto_class, "tokenizer": str(source.tokenizer),
            "providers": provider_list(backend), "threads": threads, "text": text, "gpu": backend.gpu,
            "root": str(source.root), "bundle": source.kind == "bundle", "task": source.task,
            "inference_precision": inference_precision(backend.kind)}


def predictor_spec(bundle: Path, item: str | list[str], threads: int = 0) -> dict[str, Any]:
    """A spec that loads the bundle as `bertedge predict` does (`Predictor`) and predicts `item`
    (a text, or a [text, pair] list) once."""
    return {"engine": PREDICTOR, "bundle": True, "root": str(bundle), "threads": threads, "text": item, "gpu": False}


def measure_cold_start(spec: dict[str, Any], runs: int) -> ColdStart:
    """Run the backend `runs` times in fresh processes; medians of each phase.

    Raises:
        RuntimeError: the child process failed (its stderr is in the message).
    """
    samples = [_cold_start_once(spec) for _ in range(runs)]

    def median(key: str) -> float:
        return float(np.median([s[key] for s in samples]))

    gpu = [s["gpu_memory_mb"] for s in samples if s.get("gpu_memory_mb") is not None]
    return ColdStart(runs=runs, seconds=median("seconds"), seconds_all=[s["seconds"] for s in samples],
                     import_s=median("import_s"), load_s=median("load_s"),
                     first_inference_s=median("first_inference_s"), peak_rss_mb=median("peak_rss_mb"),
                     imports_torch=any(s["imports_torch"] for s in samples),
                     gpu_memory_mb=float(np.median(gpu)) if gpu else None)


def _cold_start_once(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[3])  # the folder holding bertedge/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-m", "bertedge.toolchain.bench", "_cold-start", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start process failed: {proc.stderr.strip().splitlines()[-1:]}")
    sample: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    sample["seconds"] = sample.pop("done_at") - spawned
    return sample


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM restarts at exec; ru_maxrss can keep the forking parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cold_start_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the fresh process: import, load and predict once, the way a user would."""
    t0 = time.perf_counter()
    if spec["engine"] == "torch":
        import torch
        import transformers

        t1 = time.perf_counter()
        torch.set_num_threads(spec["threads"])
        model = getattr(transformers, spec["auto_class"]).from_pretrained(spec["torch_dir"]).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec["torch_dir"])
        t2 = time.perf_counter()
        with torch.inference_mode():
            model(**tokenizer([spec["text"]], return_tensors="pt"))
    elif spec["engine"] in ("cascade", PREDICTOR):  # a bundle: `Predictor`; a cascade's export folder: its stages
        t1, t2 = _cascade_cold_start(spec)
    else:
        from tokenizers import Tokenizer

        from bertedge.runtime.sessions import make_session as open_session

        if spec["engine"] == "openvino":
            import openvino  # noqa: F401  (imported here so its import counts as import time)
        t1 = time.perf_counter()
        providers = [tuple(p) if isinstance(p, list) else p for p in spec["providers"]]
        session = open_session(Path(spec["file"]), providers, spec["threads"], engine=spec["engine"],
                               inference_precision=spec["inference_precision"])
        tokenizer = Tokenizer.from_file(spec["tokenizer"])
        t2 = time.perf_counter()
        enc = tokenizer.encode(spec["text"])
        arrays = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
        session.run(None, {i.name: np.asarray([arrays[i.name]], dtype=np.int64) for i in session.get_inputs()})
    t3 = time.perf_counter()
    done_at = time.time()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_inference_s": t3 - t2, "done_at": done_at,
            "peak_rss_mb": _peak_rss_mb(), "imports_torch": "torch" in sys.modules,
            "gpu_memory_mb": gpu_memory_mb(os.getpid()) if spec["gpu"] else None}



def _cascade_cold_start(spec: dict[str, Any]) -> tuple[float, float]:
    """Import, open every stage (a bundle: `Predictor`, as `bertedge predict` does) and predict
    once; (imports done, stages loaded) as perf_counter times."""
    import json as json_

    from bertedge.runtime.cascade import CascadeSpec
    from bertedge.runtime.features import load_tokenizer, pad_batch, pad_id
    from bertedge.runtime.predictor import Predictor
    from bertedge.runtime.stages import open_cascade

    t1 = time.perf_counter()
    if spec["bundle"]:
        predictor = Predictor(spec["root"], threads=spec["threads"])
        t2 = time.perf_counter()
        predictor.predict([spec["text"]])
        return t1, t2
    tokenizer = load_tokenizer(Path(spec["tokenizer"]))
    cascade = CascadeSpec.from_dict(json_.loads(Path(spec["file"]).read_text(encoding="utf-8")))
    opened = open_cascade(Path(spec["root"]), cascade, get_task(spec["task"]), pad_id(tokenizer), threads=spec["threads"])
    t2 = time.perf_counter()
    opened.run_batch(pad_batch([tokenizer.encode(spec["text"])], opened.pad_id))
    return t1, t2


def main(argv: Sequence[str]) -> int:
    """Hidden entry for the cold-start child: `python -m bertedge.toolchain.bench _cold-start SPEC_JSON`."""
    if len(argv) != 2 or argv[0] != "_cold-start":
        print("usage: python -m bertedge.toolchain.bench _cold-start SPEC_JSON (internal; use `bertedge bench`)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(json.dumps(_cold_start_child(json.loads(argv[1]))))
    return 0
