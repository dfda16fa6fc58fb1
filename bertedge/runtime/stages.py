"""A cascade's files and sessions: the export's `cascade.json`, the bundle's stage names, and one
session per stage behind `run_cascade`.

Export writes `cascade.json` (a `CascadeSpec` naming each stage's artifact kind, engine, files in
the export folder and delta); `bertedge package --artifact cascade` copies each stage's files
under stage-prefixed names (`stage1.xml` + `stage1.bin`, `stage2.onnx`) and records the spec in
the manifest's `cascade` field. Export, the `Predictor` and bench all open a cascade through
`open_cascade`, so each answers through the same `run_cascade` call.

Torch-free (runtime side of the dependency wall).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from bertedge.errors import BertedgeError
from bertedge.runtime.artifacts import ARTIFACT_KINDS, CASCADE, ENGINES, inference_precision
from bertedge.runtime.cascade import CascadeSpec, Feeds, Outputs, Runner, graph_runner, run_cascade
from bertedge.runtime.tasks import Task

SPEC_FILE = "cascade.json"  # the kind's file in an export folder
EXPORT_AGAIN = "run `bertedge export MODEL_DIR --out EXPORT_DIR` again"


def stage_files(n: int, engine: str) -> tuple[str, ...]:
    """The names stage `n` (1-based) takes in a bundle: the engine's file suffixes, stage-prefixed.

    >>> stage_files(1, "openvino"), stage_files(2, "onnxruntime")
    (('stage1.xml', 'stage1.bin'), ('stage2.onnx',))
    """
    return tuple(f"stage{n}{PurePosixPath(name).suffix}" for name in ENGINES[engine].bundle_files)


def bundle_spec(spec: CascadeSpec) -> CascadeSpec:
    """The same cascade with each stage's files renamed as a bundle holds them (`stage_files`)."""
    return CascadeSpec(tuple(replace(s, files=stage_files(n, s.engine)) for n, s in enumerate(spec.stages, start=1)))


def stage_kind_problems(spec: CascadeSpec) -> list[str]:
    """Stages must be artifact kinds this bertedge knows (no cascade in a cascade), on their kind's engine."""
    problems = []
    for n, s in enumerate(spec.stages, start=1):
        kind = ARTIFACT_KINDS.get(s.artifact) if isinstance(s.artifact, str) else None
        if kind is None or kind.engine == CASCADE:
            problems.append(f"stage {n} artifact {s.artifact!r} is not a single-model kind this bertedge knows")
        elif kind.engine != s.engine:
            problems.append(f"stage {n} engine {s.engine!r} is not its artifact {s.artifact!r}'s ({kind.engine})")
    return problems


def read_export_spec(export_dir: Path, report: dict[str, Any], record: dict[str, Any]) -> tuple[CascadeSpec, list[dict[str, Any]]]:
    """The export folder's cascade spec (the cascade `record`'s file) and a record per stage,
    checked: a stage is an artifact the report lists, with that artifact's own files, or a draft
    (a student's artifact copied in by `--draft`) whose files the cascade record checksums.

    Raises:
        BertedgeError: the spec is unreadable or wrong, or names an artifact the export lacks.
    """
    path = export_dir / str(record["file"])
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise BertedgeError(f"'{path}' is not a readable cascade spec ({str(e)[:200]})", EXPORT_AGAIN) from None
    spec = CascadeSpec.from_dict(raw)
    records = {a.get("name"): a for a in report.get("artifacts", []) if isinstance(a, dict)}
    recorded = record.get("sha256")
    checksums: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    problems = stage_kind_problems(spec)
    stages = []
    for n, s in enumerate(spec.stages, start=1):
        found = records.get(s.artifact)
        if s.artifact in ARTIFACT_KINDS and tuple(s.files) != ARTIFACT_KINDS[s.artifact].files:
            if not all(f in checksums for f in s.files):
                problems.append(f"stage {n} files {list(s.files)} are neither artifact {s.artifact!r}'s nor "
                                "checksummed by the cascade")
            stages.append({"name": f"draft {s.artifact}", "file": s.files[0], "engine": s.engine,
                           "sha256": {f: checksums.get(f) for f in s.files}})
        elif found is None or not found.get("file"):
            problems.append(f"stage {n} artifact {s.artifact!r} is not in the export (or its files were removed)")
        else:
            stages.append(found)
    if problems:
        raise BertedgeError(f"'{path}': {'; '.join(problems)}", EXPORT_AGAIN)
    return spec, stages


# ----------------------------------------------------------------------------- running


@dataclass
class OpenedCascade:
    """A cascade ready to run: one session and runner per stage, the deltas and the task's margin."""

    spec: CascadeSpec
    sessions: list[Any]  # onnxruntime or OpenVINO sessions, stage 1 first
    runners: list[Runner]
    task: Task
    pad_id: int

    def run(self, batches: Sequence[Feeds], batch_size: int,
            groups: Sequence[Sequence[int]] | None = None) -> tuple[list[Outputs], list[np.ndarray]]:
        """`run_cascade` over tokenizer-named batches (MARGIN_MASK included): outputs per batch
        and, per row, the 0-based stage that answered it."""
        return run_cascade(batches, self.runners, self.spec.deltas, self.task.margin, self.pad_id, batch_size,
                           per_token=self.task.per_token_outputs, groups=groups)

    def run_batch(self, feeds: Feeds) -> Outputs:
        """One batch through the cascade (its escalations pooled within it): export's `Run`."""
        return self.run([feeds], max(1, len(feeds["input_ids"])))[0][0]


def open_cascade(root: Path, spec: CascadeSpec, task: Task, pad_id: int, providers: Sequence[Any] = ("CPUExecutionProvider",),
                 threads: int | None = None, spin: bool = True,
                 fix: str = "rebuild the bundle with `bertedge package`") -> OpenedCascade:
    """Open every stage's graph (`root / stage.files[0]`) on its engine, in its artifact kind's
    inference precision; each must have the task's outputs.

    Raises:
        BertedgeError: a stage cannot be loaded, or lacks one of the task's outputs.
    """
    from bertedge.runtime.sessions import feed_plan, make_session

    sessions = [make_session(root / s.files[0], providers, threads, spin=spin, engine=s.engine, fix=fix,
                             inference_precision=inference_precision(s.artifact))
                for s in spec.stages]
    names = list(task.output_names)
    for n, session in enumerate(sessions, start=1):
        absent = [o for o in names if o not in {x.name for x in session.get_outputs()}]
        if absent:
            raise BertedgeError(f"cascade stage {n} ({spec.stages[n - 1].files[0]}) has no output "
                                f"{', '.join(absent)} for task '{task.name}'", fix)
    runners = [graph_runner(s, names, feed_plan(s)) for s in sessions]
    return OpenedCascade(spec, sessions, runners, task, pad_id)
