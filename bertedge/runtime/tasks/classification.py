"""Sequence classification (single texts or sentence pairs): reading, encoding, decoding into
label / score / probabilities, and the task record.

Numpy + tokenizers only: the runtime uses the decoding, training uses all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from bertedge.runtime.features import Features
from bertedge.runtime.metrics import classification_metrics, softmax
from bertedge.runtime.records import Pair
from bertedge.runtime.tasks import (
    Arrays,
    DecodeOptions,
    Result,
    Schema,
    Task,
    WindowOutputs,
    top_two_margin,
)

# --- training and evaluation ------------------------------------------------------------------


def _load(path: Any, columns: Columns, labels: Sequence[str] | None, bad_rows: BadRows) -> TextExamples:
    return load_text_classification(path, columns, labels, bad_rows=bad_rows)


def _encode(tok: Tokenizer, ex: TextExamples, max_length: int, stride: int) -> Features:
    tok.enable_truncation(max_length)
    inputs: list[Any] = list(zip(ex.texts, ex.pairs)) if ex.pairs is not None else list(ex.texts)
    encodings = tok.encode_batch(inputs)
    tok.no_truncation()
    return Features(encodings, list(range(len(encodings))), list(ex.labels) if ex.labels is not None else None,
                    [bool(e.overflowing) for e in encodings])


def _predict(outputs: WindowOutputs, features: Features, ex: Any, labels: Sequence[str]) -> list[int]:
    return [int(o["logits"].argmax()) for o in outputs]


def _score(pred: list[int], ex: TextExamples, labels: Sequence[str]) -> dict[str, Any]:
    assert ex.labels is not None
    return classification_metrics(ex.labels, pred, list(labels))


def _targets(targets: list[Any], width: int) -> dict[str, np.ndarray]:
    return {"labels": np.asarray(targets, dtype=np.int64)}


def _split(ex: TextExamples, fraction: float, seed: int) -> tuple[TextExamples, TextExamples]:
    return seeded_split(ex, fraction, seed)


# --- the runtime ------------------------------------------------------------------------------


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


def one_window_each(tokenizer: Tokenizer, pairs: list[Pair], cap: int) -> Features:
    """One window per item (a text or a pair), truncated at the tokenizer's max length.

    A text longer than `cap` characters is cut first, so one giant input cannot stall a batch.
    """
    cut = [len(t) > cap or (p is not None and len(p) > cap) for t, p in pairs]
    inputs = [t[:cap] if p is None else (t[:cap], p[:cap]) for t, p in pairs]
    try:
        encodings = tokenizer.encode_batch(inputs)
    except Exception as e:  # e.g. a pair given to a tokenizer with no pair template
        raise BertedgeError(f"tokenizing failed ({e})", "check the inputs (pairs need a pair-aware tokenizer)") from None
    return Features(encodings, list(range(len(pairs))),
                    truncated=[c or bool(e.overflowing) for c, e in zip(cut, encodings, strict=True)])


def truncate_at(tokenizer: Tokenizer, max_length: int, stride: int) -> None:
    """Cut every window at max_length tokens (classification and NER take one window per item)."""
    tokenizer.enable_truncation(max_length)


def _decode(pairs: list[Pair], features: Features, outputs: WindowOutputs, labels: Sequence[str],
            options: DecodeOptions) -> list[Result]:
    return decode_classification(np.stack([o["logits"] for o in outputs]), list(labels))


def label_margin(outputs: Arrays, feeds: Arrays) -> np.ndarray:
    """Per row: the top-1 minus top-2 class probability (the feeds are not needed).

    >>> label_margin({"logits": np.array([[0.0, 0.0], [2.0, 0.0]])}, {}).round(4).tolist()
    [0.0, 0.7616]
    """
    return top_two_margin(outputs["logits"])


def _schema(labels: Sequence[str], options: DecodeOptions) -> Schema:
    return {"label": "string", "score": "float64", "probabilities": {lab: "float64" for lab in labels}}


CLASSIFICATION: Task = Task(
    name="classification",
    hf_auto_class="AutoModelForSequenceClassification",
    hf_architecture_suffix="ForSequenceClassification",
    output_names=("logits",),
    per_token_outputs=False,
    metric="accuracy",
    default_max_length=128,
    load=_load, split=_split, encode=_encode, predict=_predict, score=_score, targets=_targets,
    check_item=lambda item: None,  # a text or a pair: the tokenizer's template decides
    input_columns=None,
    setup_tokenizer=truncate_at,
    encode_items=one_window_each,
    decode=_decode,
    example_item=("a short example text", None),
    output_schema=_schema,
    texts=lambda ex: list(ex.texts),
    items=lambda ex: list(zip(ex.texts, ex.pairs or [None] * len(ex.texts), strict=True)),
    margin=label_margin,
    margin_tokens=lambda enc: [1] * len(enc.ids),  # unused: the margin reads the logits alone
    check_train=check_trainable,
)
