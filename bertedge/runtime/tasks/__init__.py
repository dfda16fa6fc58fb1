"""Tasks as data: one small record per task that finetune, export, bench and the runtime look up.

A task says which Hugging Face head it trains, what its ONNX graph outputs, how a labelled
file is read, how inputs become model windows (`Features`), how window outputs become
predictions, and how predictions are scored. Evaluation anywhere is therefore the same four
calls: `load` -> `encode` -> run the model over the windows -> `predict` -> `score`.

This module sits on the numpy side of the dependency wall: the runtime imports it, so it must
never import torch or transformers. Training imports the post-processing from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bertedge.errors import BertedgeError
from bertedge.runtime.data import (
    BadRows,
    Columns,
    TextExamples,
    check_trainable,
    load_text_classification,
    seeded_split,
)
from bertedge.runtime.features import IGNORE, Features
from bertedge.runtime.metrics import classification_metrics, softmax
from bertedge.runtime.tasks import ner, qa

WindowOutputs = list[dict[str, np.ndarray]]  # one {output name: array} per window, padding removed


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
    load: Callable[[Path, Columns, Sequence[str] | None, BadRows], Any]  # labelled file -> examples
    split: Callable[[Any, float, int], tuple[Any, Any]]  # (examples, eval share, seed) -> train, eval
    encode: Callable[[Tokenizer, Any, int, int], Features]  # (tok, examples, max_len, stride) + targets
    predict: Callable[[WindowOutputs, Features, Any, Sequence[str]], list[Any]]  # -> one per example
    score: Callable[[list[Any], Any, Sequence[str]], dict[str, Any]]  # -> {metric: ..., ...}
    targets: Callable[[list[Any], int], dict[str, np.ndarray]]  # window targets -> padded loss labels


# --- classification ---------------------------------------------------------------------------

def _cls_load(path: Path, columns: Columns, labels: Sequence[str] | None, bad_rows: BadRows) -> TextExamples:
    return load_text_classification(path, columns, labels, bad_rows=bad_rows)


def _cls_encode(tok: Tokenizer, ex: TextExamples, max_length: int, stride: int) -> Features:
    tok.enable_truncation(max_length)
    inputs: list[Any] = list(zip(ex.texts, ex.pairs)) if ex.pairs is not None else list(ex.texts)
    encodings = tok.encode_batch(inputs)
    tok.no_truncation()
    return Features(encodings, list(range(len(encodings))), list(ex.labels) if ex.labels is not None else None,
                    [bool(e.overflowing) for e in encodings])


def _cls_predict(outputs: WindowOutputs, features: Features, ex: Any, labels: Sequence[str]) -> list[int]:
    return [int(o["logits"].argmax()) for o in outputs]


def _cls_score(pred: list[int], ex: TextExamples, labels: Sequence[str]) -> dict[str, Any]:
    assert ex.labels is not None
    return classification_metrics(ex.labels, pred, list(labels))


def _cls_targets(targets: list[Any], width: int) -> dict[str, np.ndarray]:
    return {"labels": np.asarray(targets, dtype=np.int64)}


def _cls_split(ex: TextExamples, fraction: float, seed: int) -> tuple[TextExamples, TextExamples]:
    train, evalset = seeded_split(ex, fraction, seed)
    check_trainable(train)
    return train, evalset


CLASSIFICATION = Task(
    name="classification",
    hf_auto_class="AutoModelForSequenceClassification",
    hf_architecture_suffix="ForSequenceClassification",
    output_names=("logits",),
    per_token_outputs=False,
    metric="accuracy",
    default_max_length=128,
    load=_cls_load, split=_cls_split, encode=_cls_encode, predict=_cls_predict, score=_cls_score,
    targets=_cls_targets,
)


# --- token classification (NER) ---------------------------------------------------------------

def _ner_load(path: Path, columns: Columns, labels: Sequence[str] | None, bad_rows: BadRows) -> ner.NerExamples:
    return ner.read_ner(path, labels)


def _ner_split(ex: ner.NerExamples, fraction: float, seed: int) -> tuple[ner.NerExamples, ner.NerExamples]:
    return seeded_split(ex, fraction, seed)


def _ner_encode(tok: Tokenizer, ex: ner.NerExamples, max_length: int, stride: int) -> Features:
    return ner.encode_words(tok, ex, max_length)


def _ner_predict(outputs: WindowOutputs, features: Features, ex: ner.NerExamples,
                 labels: Sequence[str]) -> list[list[str]]:
    return [ner.word_tags(o["logits"], features.encodings[i].word_ids, len(ex.words[i]), labels)
            for i, o in enumerate(outputs)]


def _ner_score(pred: list[list[str]], ex: ner.NerExamples, labels: Sequence[str]) -> dict[str, Any]:
    assert ex.tags is not None
    gold = [[labels[t] for t in tags] for tags in ex.tags]
    return ner.entity_scores(gold, pred)


def _ner_targets(targets: list[Any], width: int) -> dict[str, np.ndarray]:
    out = np.full((len(targets), width), IGNORE, dtype=np.int64)
    for row, t in enumerate(targets):
        out[row, :len(t)] = t
    return {"labels": out}


NER = Task(
    name="ner",
    hf_auto_class="AutoModelForTokenClassification",
    hf_architecture_suffix="ForTokenClassification",
    output_names=("logits",),
    per_token_outputs=True,
    metric="f1",
    default_max_length=128,
    load=_ner_load, split=_ner_split, encode=_ner_encode, predict=_ner_predict, score=_ner_score,
    targets=_ner_targets,
)


# --- extractive question answering ------------------------------------------------------------

@dataclass
class QaExamples:
    """SQuAD-style examples (a list with the attributes the stages expect)."""

    items: list[qa.QaExample]
    source: str
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> QaExamples:
        return QaExamples([self.items[i] for i in indices], self.source)


def _qa_load(path: Path, columns: Columns, labels: Sequence[str] | None, bad_rows: BadRows) -> QaExamples:
    return QaExamples(qa.read_squad(path), str(path))


def _qa_split(ex: QaExamples, fraction: float, seed: int) -> tuple[QaExamples, QaExamples]:
    titles = sorted({e.title for e in ex.items})
    n_eval = max(1, int(round(len(titles) * fraction)))
    train, held = qa.split_by_article(ex.items, n_eval, seed)
    return QaExamples(train, ex.source), QaExamples(held, ex.source)


def _qa_encode(tok: Tokenizer, ex: QaExamples, max_length: int, stride: int) -> Features:
    qa.configure_windows(tok, max_length, stride)
    features = qa.encode_qa(tok, [e.question for e in ex.items], [e.context for e in ex.items],
                            [e.answers[0] if e.answers else None for e in ex.items])
    tok.no_truncation()
    return features


def _qa_predict(outputs: WindowOutputs, features: Features, ex: QaExamples, labels: Sequence[str]) -> list[str]:
    windows: list[list[Any]] = [[] for _ in range(len(ex))]
    for w, o in enumerate(outputs):
        windows[features.example_index[w]].append((features.encodings[w], o["start_logits"], o["end_logits"]))
    answers = []
    for e, wins in zip(ex.items, windows):
        best = qa.best_spans(wins, e.context)
        answers.append(best[0]["text"] if best else "")
    return answers


def _qa_score(pred: list[str], ex: QaExamples, labels: Sequence[str]) -> dict[str, Any]:
    return qa.squad_scores(pred, ex.items)


def _qa_targets(targets: list[Any], width: int) -> dict[str, np.ndarray]:
    arr = np.asarray(targets, dtype=np.int64).reshape(-1, 2)
    return {"start_positions": arr[:, 0], "end_positions": arr[:, 1]}


QA = Task(
    name="qa",
    hf_auto_class="AutoModelForQuestionAnswering",
    hf_architecture_suffix="ForQuestionAnswering",
    output_names=("start_logits", "end_logits"),
    per_token_outputs=True,
    metric="f1",
    default_max_length=384,
    load=_qa_load, split=_qa_split, encode=_qa_encode, predict=_qa_predict, score=_qa_score,
    targets=_qa_targets,
)

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
