"""The one owner of model metadata: task, labels, max length, stride, model type, positions.

`bertedge finetune` writes `bertedge.json` beside a Hugging Face `config.json` (through
`write_meta`, the one writer); export copies it, `package` turns it into the bundle manifest.
Every stage reads it back through `read_model_meta` (a model or export folder), and config.json
through `read_config`, with one set of defaults, one max-length range and one clean error for
a bad file. Stdlib + task records only: the runtime imports it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertedge.errors import BertedgeError
from bertedge.runtime.tasks import Task, get_task, task_for_architecture

if TYPE_CHECKING:
    from bertedge.runtime.manifest import Manifest

META_FILE = "bertedge.json"
CONFIG_FILE = "config.json"
DEFAULT_POSITIONS = 512  # BERT's position table when config.json does not say
MIN_LENGTH = 8  # the shortest window: [CLS] + [SEP] (+ a pair's [SEP]) leave room for text
MAX_POSITIONS = 1 << 20  # far past any encoder's position table; bounds hostile manifests
OFFSET_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet")
WINDOWED_TASKS = ("qa",)  # tasks that split a long input into overlapping windows (use a stride)
FINETUNE_AGAIN = "re-run `bertedge finetune`"


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

    def __post_init__(self) -> None:
        check_labels(self.labels, "the model's labels", FINETUNE_AGAIN + " with unique --label-names")

    def to_json(self) -> dict[str, Any]:
        """The bertedge.json / manifest fields this record owns."""
        return {"task": self.task.name, "labels": list(self.labels), "max_length": self.max_length,
                "stride": self.stride, "model_type": self.model_type, "max_positions": self.max_positions}


@dataclass(frozen=True)
class ModelConfig:
    """The facts bertedge reads from a Hugging Face config.json."""

    model_type: str  # "" when config.json does not say
    architectures: tuple[str, ...]
    labels: tuple[str, ...]  # id2label in index order
    max_positions: int  # tokens a window may hold (see `position_limit`)
    vocab_size: int = 0
    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0


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
    if config.get("model_type") in OFFSET_POSITION_TYPES:
        positions -= int(config.get("pad_token_id") or 1) + 1
    return positions


def check_max_length(max_length: int, max_positions: int, where: str) -> None:
    """The one max-length range: MIN_LENGTH..the position table (onnxruntime fails past it).

    >>> check_max_length(4, 512, "--max-length")
    Traceback (most recent call last):
    ...
    bertedge.errors.BertedgeError: max_length 4 in --max-length is outside 8..512 (the model has 512 positions) -- use --max-length 8 or more
    """
    if not MIN_LENGTH <= max_length <= max_positions:
        fix = f"use --max-length {MIN_LENGTH} or more" if max_length < MIN_LENGTH \
            else f"use --max-length {max_positions} or less"
        raise BertedgeError(f"max_length {max_length} in {where} is outside {MIN_LENGTH}..{max_positions} "
                            f"(the model has {max_positions} positions)", fix)


def resolve_max_length(asked: int, task: Task, max_positions: int, where: str = "--max-length") -> int:
    """The window length: `asked`, or (0) the task's default within the position table; checked.

    >>> from bertedge.runtime.tasks import QA
    >>> resolve_max_length(0, QA, 128), resolve_max_length(64, QA, 128)
    (128, 64)
    """
    max_length = asked or min(max_positions, task.default_max_length)
    check_max_length(max_length, max_positions, where if asked else f"the {task.name} default")
    return max_length


def resolve_stride(asked: int, task: Task, max_length: int, where: str = "--stride") -> int:
    """The QA window overlap: `asked`, or (0) derived from max_length; tasks without windows
    always get the derived value (they never use it).

    >>> from bertedge.runtime.tasks import QA, CLASSIFICATION
    >>> resolve_stride(0, QA, 64), resolve_stride(128, CLASSIFICATION, 32), resolve_stride(8, QA, 32)
    (32, 16, 8)
    """
    if task.name not in WINDOWED_TASKS or not asked:
        return default_stride(max_length)
    if not 0 < asked < max_length:
        raise BertedgeError(f"{where} {asked} must be in 1..{max_length - 1} (less than the max length "
                            f"{max_length})", f"use --stride {default_stride(max_length)} (or 0 for that default)")
    return asked


def duplicate_labels(labels: Sequence[Any]) -> list[Any]:
    """Labels that appear more than once, in first-seen order.

    >>> duplicate_labels(["pos", "neg", "pos"])
    ['pos']
    """
    return [x for x, n in Counter(labels).items() if n > 1]


def check_labels(labels: Sequence[str], where: str, fix: str) -> None:
    """Refuse repeated label names: two logits under one name cannot be told apart."""
    repeated = duplicate_labels(labels)
    if repeated:
        names = ", ".join(repr(str(x)[:40]) for x in repeated[:10]) + (" ..." if len(repeated) > 10 else "")
        raise BertedgeError(f"{where} repeat {names}: each label needs its own name", fix)


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from a file, or one BertedgeError naming the file and the fix."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BertedgeError(f"'{path}' is not valid JSON ({type(e).__name__})"
                            if isinstance(e, RecursionError) else f"'{path}' is not valid JSON ({e})", fix) from None
    if not isinstance(data, dict):
        raise BertedgeError(f"'{path}' does not hold a JSON object", fix)
    return data


def read_config(model_dir: Path) -> ModelConfig:
    """config.json of a model folder as a record: the one reader.

    Raises:
        BertedgeError: no config.json (not a model folder), or one that is unreadable.
    """
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise BertedgeError(
            f"'{model_dir}' is not a model folder (no config.json)",
            "point at the --out folder of `bertedge finetune` or any Hugging Face model folder",
        )
    config = read_json_object(path, "restore the file from the model folder")

    def number(*keys: str) -> int:
        return next((int(config[k]) for k in keys if config.get(k)), 0)

    try:
        id2label = config.get("id2label") or {}
        return ModelConfig(
            model_type=str(config.get("model_type") or ""),
            architectures=tuple(str(a) for a in config.get("architectures") or ()),
            labels=tuple(str(id2label[k]) for k in sorted(id2label, key=int)),
            max_positions=position_limit(config), vocab_size=number("vocab_size"),
            num_layers=number("num_hidden_layers", "n_layers"), hidden_size=number("hidden_size", "dim"),
            num_heads=number("num_attention_heads", "n_heads"))
    except (TypeError, ValueError, AttributeError) as e:
        raise BertedgeError(f"'{path}' has unreadable fields ({e})", "restore the file from the model folder") from None


def read_model_meta(model_dir: Path) -> ModelMeta:
    """Task, labels and shape facts of a model or export folder (config.json + bertedge.json).

    Raises:
        BertedgeError: the folder is not a Hugging Face model with a supported head, or its
            metadata is unreadable or inconsistent.
    """
    config = read_config(model_dir)
    meta_path = model_dir / META_FILE
    meta = read_json_object(meta_path, FINETUNE_AGAIN) if meta_path.is_file() else {}
    if "task" in meta:
        task = get_task(str(meta["task"]))
    elif config.architectures:
        task = task_for_architecture(config.architectures[0])
    else:
        raise BertedgeError(f"'{model_dir / CONFIG_FILE}' names no architecture, so the task is unknown",
                            "fine-tune it with `bertedge finetune` first")
    if not isinstance(meta.get("labels", []), list):
        raise BertedgeError(f"'{meta_path}' labels must be a list of names", FINETUNE_AGAIN)
    try:
        labels = tuple(str(x) for x in (meta.get("labels") or config.labels))
        max_length = int(meta.get("max_length") or 0)
        stride = int(meta.get("stride") or 0)
    except (TypeError, ValueError) as e:
        raise BertedgeError(f"'{model_dir}' has unreadable labels or lengths ({e})", FINETUNE_AGAIN) from None
    check_labels(labels, f"the labels of '{model_dir}'", FINETUNE_AGAIN + " with unique --label-names")
    max_length = resolve_max_length(max_length, task, config.max_positions, str(meta_path))
    return ModelMeta(
        task=task, labels=labels, max_length=max_length,
        stride=resolve_stride(stride, task, max_length, f"stride in '{meta_path}'"),
        model_type=config.model_type or "bert", max_positions=config.max_positions,
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_heads=config.num_heads,
    )


def write_meta(folder: Path, meta: ModelMeta, **extra: Any) -> None:
    """Write bertedge.json: the record's fields plus provenance extras (base model, columns...)."""
    (folder / META_FILE).write_text(json.dumps({**meta.to_json(), **extra}, indent=1) + "\n", encoding="utf-8")


def meta_from_manifest(manifest: Manifest) -> ModelMeta:
    """The metadata a bundle manifest carries (see `bertedge.runtime.manifest.Manifest.meta`)."""
    return manifest.meta()
