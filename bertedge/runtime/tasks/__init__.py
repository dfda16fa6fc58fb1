"""Tasks as data: one small record per task that finetune, export, bench, the runtime and the
edges look up.

A task owns both sides of the model. Training and evaluation: which Hugging Face head it
trains, what its ONNX graph outputs, how a labelled file is read, how examples become model
windows (`Features`) and loss targets, how window outputs become predictions and how those
are scored (`load` -> `encode` -> run the windows -> `predict` -> `score`). The runtime: what
an item must look like (`check_item`), which input columns it reads by default, how items
become windows (`encode_items`), how outputs become results (`decode`, with `DecodeOptions`),
an example item for probes and warm-up, and the result's schema. Cascades: how confident an
answer is (`margin`, one number in [0, 1] per batch row; rows below a stage's delta escalate
to the next stage) and which tokens that margin looks at (`margin_tokens`). No code outside
the task modules asks a task its name to decide what to do.

Each task lives in its own module (`classification`, `ner`, `qa`), which ends with its record.
This package sits on the numpy side of the dependency wall: the runtime imports it, so it must
never import torch or transformers. Training imports the post-processing from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from bertedge.errors import BertedgeError
from bertedge.runtime.data import BadRows, Columns
from bertedge.runtime.features import Features
from bertedge.runtime.metrics import softmax
from bertedge.runtime.records import Pair

WindowOutputs = list[dict[str, np.ndarray]]  # one {output name: array} per window, padding removed
Result = dict[str, Any]  # one item's prediction, as `bertedge predict` prints it
# A result schema without pyarrow: field -> "string" | "int64" | "float64" | "bool", a dict
# (a struct of named fields) or a one-element list (a list of that type).
Schema = dict[str, Any]
Arrays = dict[str, np.ndarray]  # a padded batch: feeds by tokenizer name, or outputs by graph name
# The feed (beside input_ids, attention_mask, token_type_ids) that marks, per token, whether it
# counts toward the confidence margin: 1 for the tokens the task decodes, 0 for specials, the
# question of a QA window and padding. The graph never reads it.
MARGIN_MASK = "margin_mask"


def top_two_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability along the last axis, in float64 (1.0 for one class).

    >>> top_two_margin(np.array([[0.0, 0.0], [0.0, 20.0]])).round(6).tolist()
    [0.0, 1.0]
    """
    probs = softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    if probs.shape[-1] < 2:
        return np.ones(probs.shape[:-1])
    top = np.partition(probs, -2, axis=-1)
    return top[..., -1] - top[..., -2]


def scored_mask(feeds: Arrays) -> np.ndarray:
    """The tokens a margin looks at: MARGIN_MASK when the feeds carry it, else every real token."""
    return np.asarray(feeds.get(MARGIN_MASK, feeds["attention_mask"])) != 0


class Aggregation(str, Enum):
    """How NER sub-word predictions become word and entity predictions (Hugging Face's names)."""

    SIMPLE = "simple"  # group sub-tokens by their own B-/I- tags
    FIRST = "first"  # a word takes the label of its first sub-token
    MAX = "max"  # a word takes the label of its most confident sub-token
    AVERAGE = "average"  # a word takes the argmax of its sub-tokens' mean probabilities


@dataclass(frozen=True)
class DecodeOptions:
    """How window outputs become results; each task reads the options that concern it."""

    aggregation: Aggregation = Aggregation.FIRST  # NER: sub-words -> words -> entities
    top_k: int = 1  # QA: answer spans returned (the best is always "answer")
    max_answer_tokens: int = 30  # QA: the longest answer span considered

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "aggregation", Aggregation(self.aggregation))
        except ValueError:
            raise BertedgeError(f"unknown NER aggregation '{self.aggregation}'",
                                f"use one of: {', '.join(a.value for a in Aggregation)}") from None
        if self.top_k < 1:
            raise BertedgeError(f"--top-k must be at least 1 (got {self.top_k})", "use --top-k 1")
        if self.max_answer_tokens < 1:
            raise BertedgeError(f"max_answer_tokens must be at least 1 (got {self.max_answer_tokens})",
                                "use 30, the SQuAD convention")


@dataclass(frozen=True)
class Task:
    """Everything a stage needs to know about one task."""

    name: str
    hf_auto_class: str  # transformers Auto class that builds the head
    hf_architecture_suffix: str  # config.architectures[0] ends with this
    output_names: tuple[str, ...]  # ONNX graph outputs, in order
    per_token_outputs: bool  # outputs have a sequence axis (NER, QA) or not (classification)
    metric: str  # headline metric key (0..1, higher is better) used by the accuracy budget
    default_max_length: int
    # --- training and evaluation on labelled files
    load: Callable[[Path, Columns, Sequence[str] | None, BadRows], Any]  # labelled file -> examples
    split: Callable[[Any, float, int], tuple[Any, Any]]  # (examples, eval share, seed) -> train, eval
    encode: Callable[[Tokenizer, Any, int, int], Features]  # (tok, examples, max_len, stride) + targets
    predict: Callable[[WindowOutputs, Features, Any, Sequence[str]], list[Any]]  # -> one per example
    score: Callable[[list[Any], Any, Sequence[str]], dict[str, Any]]  # -> {metric: ..., ...}
    targets: Callable[[list[Any], int], dict[str, np.ndarray]]  # window targets -> padded loss labels
    # --- the runtime: items in, results out
    check_item: Callable[[Pair], str | None]  # what is wrong with an item for this task, if anything
    input_columns: tuple[tuple[str, ...], tuple[str, ...]] | None  # default (text, pair) columns
    setup_tokenizer: Callable[[Tokenizer, int, int], None]  # (tok, max_length, stride), once at load
    encode_items: Callable[[Tokenizer, list[Pair], int], Features]  # (tok, items, char cap per text)
    decode: Callable[[list[Pair], Features, WindowOutputs, Sequence[str], DecodeOptions], list[Result]]
    example_item: Pair  # an item every model of this task accepts (probes, warm-up)
    output_schema: Callable[[Sequence[str], DecodeOptions], Schema]  # (labels, options) -> fields
    # --- examples, whatever the task
    texts: Callable[[Any], list[str]]  # the examples' raw text (bench fills its timed inputs with it)
    items: Callable[[Any], list[Pair]]  # the examples as the runtime's input items (export's agreement texts)
    # --- cascades: how to tell a confident answer (rows with margin < delta escalate)
    margin: Callable[[Arrays, Arrays], np.ndarray]  # (outputs, feeds) -> one margin in [0, 1] per row
    margin_tokens: Callable[[Encoding], list[int]]  # per token: 1 if it counts toward the margin
    check_train: Callable[[Any], None] = lambda examples: None  # refuse untrainable data (one class...)

    def columns(self, text_columns: tuple[str, ...], pair_columns: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The (text, pair) input columns to read: the user's, or this task's defaults when no
        pair column was named (QA reads question + context, its question column tried first).

        >>> QA.columns(("text",), ()), QA.columns(("q",), ("c",))
        ((('question', 'text'), ('context',)), (('q',), ('c',)))
        """
        if self.input_columns is None or pair_columns:
            return text_columns, pair_columns
        return (*self.input_columns[0], *text_columns), self.input_columns[1]

    def margin_mask(self, encodings: Sequence[Encoding], width: int) -> np.ndarray:
        """The MARGIN_MASK feed for a batch padded to `width` tokens (int64, 0 on padding)."""
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            tokens = self.margin_tokens(enc)
            mask[row, :len(tokens)] = tokens
        return mask


# The task modules build their records from the names above, so they are imported last.
from bertedge.runtime.tasks.classification import CLASSIFICATION, decode_classification  # noqa: E402
from bertedge.runtime.tasks.ner import NER  # noqa: E402
from bertedge.runtime.tasks.qa import QA, QaExamples  # noqa: E402

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, NER, QA)}


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


__all__ = ["CLASSIFICATION", "MARGIN_MASK", "NER", "QA", "TASKS", "Aggregation", "Arrays", "DecodeOptions",
           "QaExamples", "Result", "Schema", "Task", "WindowOutputs", "decode_classification", "get_task",
           "scored_mask", "task_for_architecture", "top_two_margin"]
