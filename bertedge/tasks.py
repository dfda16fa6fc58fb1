"""Tasks as data: one small record per task that finetune, export, bench and the runtime look up.

This module sits on the numpy side of the dependency wall: the runtime imports it, so it must
never import torch or transformers. Training imports the post-processing from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertedge.errors import BertedgeError
from bertedge.metrics import softmax


@dataclass(frozen=True)
class Task:
    """Everything a stage needs to know about one task."""

    name: str
    hf_auto_class: str  # transformers Auto class that builds the head
    hf_architecture_suffix: str  # config.architectures[0] ends with this
    output_names: tuple[str, ...]  # ONNX graph outputs, in order
    per_token_outputs: bool  # outputs have a sequence axis (NER, QA) or not (classification)
    metric: str  # headline metric key used by the accuracy budget


CLASSIFICATION = Task(
    name="classification",
    hf_auto_class="AutoModelForSequenceClassification",
    hf_architecture_suffix="ForSequenceClassification",
    output_names=("logits",),
    per_token_outputs=False,
    metric="accuracy",
)

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION,)}


def get_task(name: str) -> Task:
    """Look a task up by name; unknown names list what exists."""
    try:
        return TASKS[name]
    except KeyError:
        raise BertedgeError(
            f"unknown task '{name}'", f"use one of: {', '.join(TASKS)}"
        ) from None


def task_for_architecture(architecture: str) -> Task:
    """The task whose HF head class matches a config.architectures entry."""
    for task in TASKS.values():
        if architecture.endswith(task.hf_architecture_suffix):
            return task
    raise BertedgeError(
        f"model head '{architecture}' is not supported",
        "fine-tune with `bertedge finetune` (sequence classification, token classification or QA heads)",
    )


def decode_classification(logits: np.ndarray, labels: list[str]) -> list[dict[str, object]]:
    """Turn a (batch, classes) logit matrix into label, score and every class probability.

    >>> decode_classification(np.array([[0.0, 2.0]]), ["neg", "pos"])[0]["label"]
    'pos'
    """
    probs = softmax(logits.astype(np.float64), axis=-1)
    best = probs.argmax(axis=-1)
    return [
        {
            "label": labels[int(b)],
            "score": float(p[b]),
            "probabilities": {lab: float(x) for lab, x in zip(labels, p)},
        }
        for b, p in zip(best, probs)
    ]


@dataclass(frozen=True)
class ModelInfo:
    """What bertedge knows about a Hugging Face model folder (read from JSON, no torch)."""

    task: Task
    labels: tuple[str, ...]
    max_length: int
    model_type: str  # config.json model_type: "bert", "distilbert", ...
    num_layers: int
    hidden_size: int
    num_heads: int


def read_model_info(model_dir: Path) -> ModelInfo:
    """Read task, labels and shape facts from config.json (+ bertedge.json when finetune wrote it).

    Raises:
        BertedgeError: the folder is not a Hugging Face model with a supported head.
    """
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise BertedgeError(
            f"'{model_dir}' is not a model folder (no config.json)",
            "point at the --out folder of `bertedge finetune` or any Hugging Face model folder",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BertedgeError(f"'{config_path}' is not valid JSON ({e})", "restore the file") from None
    meta_path = model_dir / "bertedge.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if "task" in meta:
        task = get_task(meta["task"])
    else:
        archs = config.get("architectures") or []
        if not archs:
            raise BertedgeError(
                f"'{config_path}' names no architecture, so the task is unknown",
                "fine-tune it with `bertedge finetune` first",
            )
        task = task_for_architecture(archs[0])
    id2label = config.get("id2label") or {}
    labels = tuple(meta.get("labels") or [id2label[k] for k in sorted(id2label, key=int)])
    max_positions = int(config.get("max_position_embeddings", 512))
    max_length = int(meta.get("max_length") or min(max_positions, 512))
    return ModelInfo(
        task=task,
        labels=labels,
        max_length=max_length,
        model_type=str(config.get("model_type", "bert")),
        num_layers=int(config.get("num_hidden_layers") or config.get("n_layers") or 0),
        hidden_size=int(config.get("hidden_size") or config.get("dim") or 0),
        num_heads=int(config.get("num_attention_heads") or config.get("n_heads") or 0),
    )
