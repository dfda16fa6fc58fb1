"""The one owner of model metadata: task, labels, max length, stride, model type, positions.

`bertedge finetune` writes `bertedge.json` beside a Hugging Face `config.json`; export copies it,
`package` turns it into the bundle manifest. Every stage reads it back through `read_model_meta`
(a model or export folder) or `meta_from_manifest` (a bundle), with one set of defaults and one
clean error for a bad file. Stdlib + task records only: the runtime imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertedge.errors import BertedgeError
from bertedge.runtime.tasks import Task, get_task, task_for_architecture

META_FILE = "bertedge.json"
CONFIG_FILE = "config.json"
DEFAULT_POSITIONS = 512  # BERT's position table when config.json does not say


@dataclass(frozen=True)
class ModelMeta:
    """What bertedge knows about a model, read from JSON (no torch)."""

    task: Task
    labels: tuple[str, ...]
    max_length: int  # tokens per window the model was trained / validated with
    stride: int  # QA: tokens shared by consecutive context windows
    model_type: str  # config.json model_type: "bert", "distilbert", ...
    max_positions: int  # the longest window the position embeddings allow
    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0

    def to_json(self) -> dict[str, Any]:
        """The bertedge.json / manifest fields this record owns."""
        return {"task": self.task.name, "labels": list(self.labels), "max_length": self.max_length,
                "stride": self.stride, "model_type": self.model_type, "max_positions": self.max_positions}


def default_stride(max_length: int) -> int:
    """QA window overlap when none was recorded: 128 tokens, at most half a window.

    >>> default_stride(384), default_stride(64)
    (128, 32)
    """
    return min(128, max(1, max_length // 2))


def position_limit(config: dict[str, Any]) -> int:
    """Tokens a window may hold: the position table, less RoBERTa-style offset positions.

    RoBERTa-family models and MPNet count positions from padding_idx + 1: 514 positions take
    512 tokens.

    >>> position_limit({"max_position_embeddings": 514, "model_type": "roberta", "pad_token_id": 1})
    512
    >>> position_limit({"max_position_embeddings": 512})
    512
    """
    positions = int(config.get("max_position_embeddings") or DEFAULT_POSITIONS)
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet"):
        positions -= int(config.get("pad_token_id") or 1) + 1
    return positions


def check_max_length(max_length: int, max_positions: int, where: str) -> None:
    """Refuse a window longer than the position table (onnxruntime would fail at run time)."""
    if not 1 <= max_length <= max_positions:
        raise BertedgeError(
            f"max_length {max_length} in {where} is outside 1..{max_positions} "
            f"(the model has {max_positions} positions)",
            f"use --max-length {min(max(max_length, 1), max_positions)} or less")


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from a file, or one BertedgeError naming the file and the fix."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BertedgeError(f"'{path}' is not valid JSON ({e})", fix) from None
    if not isinstance(data, dict):
        raise BertedgeError(f"'{path}' does not hold a JSON object", fix)
    return data


def read_model_meta(model_dir: Path) -> ModelMeta:
    """Task, labels and shape facts of a model or export folder (config.json + bertedge.json).

    Raises:
        BertedgeError: the folder is not a Hugging Face model with a supported head, or its
            metadata is unreadable or inconsistent.
    """
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise BertedgeError(
            f"'{model_dir}' is not a model folder (no config.json)",
            "point at the --out folder of `bertedge finetune` or any Hugging Face model folder",
        )
    config = read_json_object(config_path, "restore the file from the model folder")
    meta_path = model_dir / META_FILE
    meta = read_json_object(meta_path, "re-run `bertedge finetune`") if meta_path.is_file() else {}
    if "task" in meta:
        task = get_task(str(meta["task"]))
    else:
        archs = config.get("architectures") or []
        if not archs:
            raise BertedgeError(
                f"'{config_path}' names no architecture, so the task is unknown",
                "fine-tune it with `bertedge finetune` first",
            )
        task = task_for_architecture(str(archs[0]))
    id2label = config.get("id2label") or {}
    try:
        labels = tuple(str(x) for x in (meta.get("labels") or [id2label[k] for k in sorted(id2label, key=int)]))
        positions = position_limit(config)
        max_length = int(meta.get("max_length") or min(positions, task.default_max_length))
        stride = int(meta.get("stride") or default_stride(max_length))
    except (TypeError, ValueError, KeyError) as e:
        raise BertedgeError(f"'{model_dir}' has unreadable labels or lengths ({e})",
                            "re-run `bertedge finetune`") from None
    check_max_length(max_length, positions, str(meta_path if "max_length" in meta else config_path))
    return ModelMeta(
        task=task, labels=labels, max_length=max_length, stride=stride,
        model_type=str(config.get("model_type", "bert")), max_positions=positions,
        num_layers=int(config.get("num_hidden_layers") or config.get("n_layers") or 0),
        hidden_size=int(config.get("hidden_size") or config.get("dim") or 0),
        num_heads=int(config.get("num_attention_heads") or config.get("n_heads") or 0),
    )


def write_meta(folder: Path, meta: ModelMeta, **extra: Any) -> None:
    """Write bertedge.json: the record's fields plus provenance extras (base model, columns...)."""
    (folder / META_FILE).write_text(json.dumps({**meta.to_json(), **extra}, indent=1) + "\n", encoding="utf-8")


def meta_from_manifest(manifest: dict[str, Any]) -> ModelMeta:
    """The metadata a bundle manifest carries (already schema-checked by `bertedge.runtime.bundle`)."""
    max_length = int(manifest["max_length"])
    return ModelMeta(
        task=get_task(str(manifest["task"])), labels=tuple(manifest["labels"]), max_length=max_length,
        stride=int(manifest.get("stride") or default_stride(max_length)),
        model_type=str(manifest.get("model_type") or "bert"),
        max_positions=int(manifest.get("max_positions") or max_length),
    )
