"""Loading a backend: a torch model, an onnxruntime session (IO binding on GPUs) or an OpenVINO
session, ready to time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import CASCADE, inference_precision
from bertedge.runtime.sessions import OPENVINO, make_session
from bertedge.runtime.tasks import get_task
from bertedge.toolchain.bench.inputs import Source
from bertedge.toolchain.bench.spec import (
    CPU,
    CUDA,
    TENSORRT,
    TENSORRT_OPTIONS,
    TOKEN_INPUTS,
    Backend,
    Call,
    Feeds,
)
from bertedge.toolchain.models import load_pretrained

# ----------------------------------------------------------------------------- loading backends


@dataclass
class Loaded:
    """A backend ready to run: host call for accuracy, prepared call for timing, what it really used."""

    run: Callable[[Feeds], np.ndarray]  # host feeds -> logits on the host
    prepare: Callable[[Feeds], Call]  # host feeds -> a zero-argument call to time
    providers: list[str]  # execution providers the session really has ([] for torch)
    threads: int  # intra-op threads really in use, as measured or reported by the engine
    threads_how: str  # how `threads` was found
    load_s: float
    file: Path | None
    notes: list[str] = field(default_factory=list)
    keep: Any = None  # the session or model, kept alive while timing
    run_outputs: Callable[[Feeds], dict[str, np.ndarray]] | None = None  # every graph output, by name
    weights: tuple[Path, ...] = ()  # every file it loaded beyond `file` (an IR's .bin, a cascade's stages): its size


def _os_threads() -> int | None:
    try:
        import psutil

        return int(psutil.Process().num_threads())
    except Exception:  # psutil is optional at runtime; without it we fall back to the setting
        return None


def load_torch(source: Source, backend: Backend, threads: int) -> Loaded:
    """transformers Auto class from the task record; fp32 eager, inference_mode, `threads` threads."""
    import inspect

    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    if source.torch_dir is None:
        raise BertedgeError(f"no PyTorch model folder for '{source.root}'", "bench an export folder, not a bundle")
    model = load_pretrained(source.torch_dir, get_task(source.task).hf_auto_class, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    names = [n for n in TOKEN_INPUTS if n in inspect.signature(model.forward).parameters]

    def prepare(feeds: Feeds) -> Call:
        tensors = {n: torch.from_numpy(feeds[n]) for n in names}

        def call() -> Any:
            with torch.inference_mode():
                return model(**tensors)

        return call

    output_names = get_task(source.task).output_names

    def run_outputs(feeds: Feeds) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = model(**{n: torch.from_numpy(feeds[n]) for n in names})
        return {k: out[k].float().numpy() for k in output_names}

    def run(feeds: Feeds) -> np.ndarray:
        return run_outputs(feeds)[output_names[0]]

    return Loaded(run, prepare, [], torch.get_num_threads(), "torch.get_num_threads()", load_s, None, keep=model,
                  run_outputs=run_outputs)


def provider_list(backend: Backend) -> list[Any]:
    """The providers to ask onnxruntime for, with options, CPU last as its own fallback."""
    if backend.provider == TENSORRT:
        return [(TENSORRT, TENSORRT_OPTIONS), CUDA, CPU]
    return list(dict.fromkeys([backend.provider, CPU]))


def load_ort(source: Source, backend: Backend, threads: int) -> Loaded:
    """An onnxruntime session on the backend's file; IO binding for device backends."""

    path = source.file_for(backend)
    assert path is not None, "select_backends checks the file exists"
    before = _os_threads()
    start = time.perf_counter()
    session = make_session(path, provider_list(backend), threads, fix="run `bertedge export` again")
    load_s = time.perf_counter() - start
    after = _os_threads()
    names = [i.name for i in session.get_inputs()]
    if backend.provider == CPU and before is not None and after is not None:
        # The intra-op pool is created with the session: n threads = the caller + (n - 1) new ones.
        used, how = after - before + 1, "OS threads created by the session + 1 (psutil)"
    else:
        used, how = int(session.get_session_options().intra_op_num_threads), "session options"

    run, run_outputs = _host_runs(session, names)
    prepare = (_bound_call(session, names) if backend.io_binding
               else lambda feeds: _host_call(session, {n: feeds[n] for n in names}))
    return Loaded(run, prepare, list(session.get_providers()), used, how, load_s, path, keep=session,
                  run_outputs=run_outputs)


def load_openvino(source: Source, backend: Backend, threads: int) -> Loaded:
    """The runtime's OpenVINO session (`bertedge.runtime.sessions.OpenVINOSession`) on the file, in
    its artifact kind's inference precision."""
    path = source.file_for(backend)
    assert path is not None, "select_backends checks the file exists"
    start = time.perf_counter()
    session = make_session(path, threads=threads, engine=OPENVINO, fix="run `bertedge export` again",
                           inference_precision=inference_precision(backend.kind))
    load_s = time.perf_counter() - start
    names = [i.name for i in session.get_inputs()]
    run, run_outputs = _host_runs(session, names)
    used = int(session.compiled.get_property("INFERENCE_NUM_THREADS"))
    return Loaded(run, lambda feeds: _host_call(session, {n: feeds[n] for n in names}), session.get_providers(),
                  used, "OpenVINO INFERENCE_NUM_THREADS", load_s, path, keep=session, run_outputs=run_outputs,
                  weights=(path.with_suffix(".bin"),))


def load_cascade(source: Source, backend: Backend, threads: int) -> Loaded:
    """A cascade (an export's cascade.json, or a bundle's manifest) through `run_cascade`, one
    batch per call: each timed batch pays stage 1 and the escalations of its own rows."""
    import json

    from bertedge.runtime.bundle import read_manifest
    from bertedge.runtime.cascade import CascadeSpec
    from bertedge.runtime.features import load_tokenizer, pad_id
    from bertedge.runtime.stages import open_cascade

    path = source.file_for(backend)
    assert path is not None, "select_backends checks the file exists"
    spec = read_manifest(source.root).cascade if source.kind == "bundle" else \
        CascadeSpec.from_dict(json.loads(path.read_text(encoding="utf-8")))
    if spec is None:
        raise BertedgeError(f"'{source.root}' is not a cascade bundle", "bench it under its own artifact kind")
    start = time.perf_counter()
    opened = open_cascade(source.root, spec, get_task(source.task), pad_id(load_tokenizer(source.tokenizer)),
                          threads=threads, fix="run `bertedge export` again")
    load_s = time.perf_counter() - start
    first_output = get_task(source.task).output_names[0]

    def run_outputs(feeds: Feeds) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in opened.run_batch(dict(feeds)).items()}

    providers = list(dict.fromkeys(p for s in opened.sessions for p in s.get_providers()))
    return Loaded(lambda feeds: run_outputs(feeds)[first_output], lambda feeds: lambda: opened.run_batch(dict(feeds)),
                  providers, threads, "requested (every stage)", load_s, path, keep=opened, run_outputs=run_outputs,
                  weights=tuple(source.root / f for stage in spec.stages for f in stage.files))


def _host_runs(session: Any, names: Sequence[str]) -> tuple[Callable[[Feeds], np.ndarray],
                                                           Callable[[Feeds], dict[str, np.ndarray]]]:
    """(first output, every output by name) of a session on host feeds, as float32 numpy."""
    output_names = [o.name for o in session.get_outputs()]

    def run_outputs(feeds: Feeds) -> dict[str, np.ndarray]:
        outs = session.run(None, {n: feeds[n] for n in names})
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(output_names, outs, strict=True)}

    def run(feeds: Feeds) -> np.ndarray:
        return run_outputs(feeds)[output_names[0]]

    return run, run_outputs


def _host_call(session: Any, feeds: Feeds) -> Call:
    return lambda: session.run(None, feeds)


def _bound_call(session: Any, names: Sequence[str]) -> Callable[[Feeds], Call]:
    """IO binding: copy the inputs to the GPU once; each timed call runs and waits on the device."""
    import onnxruntime as ort

    def prepare(feeds: Feeds) -> Call:
        binding = session.io_binding()
        device_inputs = [ort.OrtValue.ortvalue_from_numpy(feeds[n], "cuda", 0) for n in names]
        for name, value in zip(names, device_inputs, strict=True):
            binding.bind_ortvalue_input(name, value)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda", 0)

        def call() -> None:
            _ = device_inputs  # the device copies must outlive the binding
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return call

    return prepare


LOADERS: dict[str, Callable[[Source, Backend, int], Loaded]] = {"torch": load_torch, "onnxruntime": load_ort,
                                                                "openvino": load_openvino, CASCADE: load_cascade}
