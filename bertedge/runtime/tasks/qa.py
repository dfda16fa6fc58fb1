"""Extractive QA: SQuAD v1.1 / JSONL reading, windows over long contexts, span search and the
official SQuAD exact-match / F1.

Numpy + tokenizers only: the runtime uses the span search, training uses all of it.
"""

from __future__ import annotations

import collections
import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from bertedge.errors import BertedgeError
from bertedge.runtime.data import read_text
from bertedge.runtime.features import Features


@dataclass
class QaExample:
    """One question on one context, with gold answers when known."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character start)
    title: str = ""


def read_squad(path: Path) -> list[QaExample]:
    """Read SQuAD v1.1 JSON or JSONL records {id?, question, context, answers}, checking each
    answer's offset against its text.

    JSONL answers may be `{"text": [...], "answer_start": [...]}` (Hugging Face datasets) or
    a list of `{"text", "answer_start"}`.
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise BertedgeError(f"{path} is empty", "give SQuAD v1.1 JSON or JSONL {question, context, answers}")
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise BertedgeError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})", "fix the file") from None
        records = _squad_records(path, doc)
    else:
        records = _jsonl_records(path, text)
    examples = [_check(path, where, rec) for where, rec in records]
    if not examples:
        raise BertedgeError(f"{path} holds no questions", "add SQuAD-style question/context records")
    return examples


def _squad_records(path: Path, doc: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise BertedgeError(f"{path} is not SQuAD v1.1 JSON (no top-level 'data' list)",
                            'use {"data": [{"title", "paragraphs": [{"context", "qas"}]}]} or JSONL')
    out = []
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(para.get("qas", [])):
                rec = dict(qa, context=para.get("context", ""), title=article.get("title", ""))
                out.append((f"data[{a}].paragraphs[{p}].qas[{q}] (id {qa.get('id', '?')})", rec))
    return out


def _jsonl_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise BertedgeError(f"{path}: line {n} is not valid JSON ({e.msg})", "fix that line") from None
    return out


def _check(path: Path, where: str, rec: dict[str, Any]) -> QaExample:
    question, context = str(rec.get("question") or ""), str(rec.get("context") or "")
    if not question.strip():
        raise BertedgeError(f"{path}: {where}: empty question", "give every record a question")
    if not context.strip():
        raise BertedgeError(f"{path}: {where}: empty context", "give every record a context")
    answers = rec.get("answers") or []
    if isinstance(answers, dict):
        answers = [{"text": t, "answer_start": s} for t, s in zip(answers.get("text", []), answers.get("answer_start", []))]
    pairs = []
    for ans in answers:
        ans_text, start = str(ans.get("text", "")), int(ans.get("answer_start", -1))
        if context[start:start + len(ans_text)] != ans_text:
            raise BertedgeError(
                f"{path}: {where}: answer {ans_text[:40]!r} is not at offset {start} of the context "
                f"(found {context[max(start, 0):max(start, 0) + len(ans_text)][:40]!r})",
                "fix answer_start (a character offset into the context)")
        pairs.append((ans_text, start))
    return QaExample(str(rec.get("id", where)), question, context, pairs, str(rec.get("title", "")))


def split_by_article(examples: Sequence[QaExample], eval_articles: int, seed: int) -> tuple[list[QaExample], list[QaExample]]:
    """Hold out whole articles (titles), seeded, so no paragraph is shared between the parts."""
    titles = sorted({e.title for e in examples})
    if len(titles) < 2:
        raise BertedgeError("QA data has fewer than two articles to split", "pass a separate --eval file")
    held = set(random.Random(seed).sample(titles, min(eval_articles, len(titles) - 1)))
    return [e for e in examples if e.title not in held], [e for e in examples if e.title in held]


def configure_windows(tokenizer: Tokenizer, max_length: int, stride: int) -> None:
    """Set the tokenizer to cut contexts (the second sequence) into overlapping windows."""
    tokenizer.enable_truncation(max_length, stride=stride, strategy="only_second")


def encode_qa(tokenizer: Tokenizer, questions: Sequence[str], contexts: Sequence[str],
              answers: Sequence[tuple[str, int] | None] | None = None) -> Features:
    """Question + context windows from a tokenizer set up by `configure_windows`: the context
    is cut into overlapping windows; the question is repeated in each.

    With `answers`, each window's target is (start token, end token) of the answer, or (0, 0)
    (the [CLS] token) when the answer is not fully inside that window.
    """
    encodings: list[Encoding] = []
    index: list[int] = []
    for i, enc in enumerate(tokenizer.encode_batch(list(zip(questions, contexts)))):
        for window in [enc] + list(enc.overflowing):
            encodings.append(window)
            index.append(i)
    targets = None
    if answers is not None:
        targets = [_window_target(encodings[w], answers[index[w]]) for w in range(len(encodings))]
    return Features(encodings, index, targets, [False] * len(questions))


def _window_target(window: Encoding, answer: tuple[str, int] | None) -> tuple[int, int]:
    """Token positions of the answer in this window, as Hugging Face's QA examples compute them."""
    if answer is None:
        return (0, 0)
    start_char, end_char = answer[1], answer[1] + len(answer[0])
    ctx = [t for t, s in enumerate(window.sequence_ids) if s == 1]
    offsets = window.offsets
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return (0, 0)  # the answer is not wholly inside this window
    start = ctx[0]
    while start <= ctx[-1] and offsets[start][0] <= start_char:
        start += 1
    end = ctx[-1]
    while end >= ctx[0] and offsets[end][1] >= end_char:
        end -= 1
    return (start - 1, end + 1)


def best_spans(windows: Sequence[tuple[Encoding, np.ndarray, np.ndarray]], context: str, top_k: int = 1,
               max_answer_tokens: int = 30, n_best: int = 20) -> list[dict[str, Any]]:
    """The top-k answer spans across windows: start <= end, both inside the context (never the
    question, special tokens or padding), at most `max_answer_tokens` long.

    Each answer: text, character start/end in `context`, score (softmax over the candidate
    spans' start+end logits), and the window it came from.
    """
    candidates: dict[tuple[int, int], tuple[float, int]] = {}
    for w, (enc, start_logits, end_logits) in enumerate(windows):
        ctx = np.array([s == 1 for s in enc.sequence_ids[: len(start_logits)]])
        if not ctx.any():
            continue
        s_masked = np.where(ctx, start_logits, -np.inf)
        e_masked = np.where(ctx, end_logits, -np.inf)
        starts = np.argsort(s_masked)[::-1][:n_best]
        ends = np.argsort(e_masked)[::-1][:n_best]
        for s in starts:
            for e in ends:
                if not (ctx[s] and ctx[e]) or e < s or e - s + 1 > max_answer_tokens:
                    continue
                span = (enc.offsets[s][0], enc.offsets[e][1])
                score = float(start_logits[s] + end_logits[e])
                if span not in candidates or candidates[span][0] < score:
                    candidates[span] = (score, w)
    if not candidates:
        return []
    ranked = sorted(candidates.items(), key=lambda kv: kv[1][0], reverse=True)
    logits = np.array([v[0] for _, v in ranked])
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return [{"text": context[a:b], "start": int(a), "end": int(b), "score": float(p), "window": int(w)}
            for ((a, b), (_, w)), p in zip(ranked[:top_k], probs[:top_k])]


# --- the official SQuAD v1.1 evaluation ------------------------------------------------------

def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse white space.

    >>> normalize_answer("The  Denver Broncos!")
    'denver broncos'
    """
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, truth: str) -> float:
    """Token-overlap F1 after normalisation.

    >>> round(f1_score("Denver Broncos", "the Broncos"), 3)
    0.667
    """
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def squad_scores(predictions: Sequence[str], examples: Sequence[QaExample]) -> dict[str, float]:
    """Exact match and F1 as fractions (x100 for the usual percent), each the max over an
    example's gold answers.

    >>> ex = QaExample("1", "q", "c", [("Denver Broncos", 0), ("Broncos", 7)])
    >>> squad_scores(["the broncos"], [ex])
    {'exact_match': 1.0, 'f1': 1.0, 'n': 1}
    """
    em = f1 = 0.0
    for pred, ex in zip(predictions, examples):
        golds = [t for t, _ in ex.answers] or [""]
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    n = max(len(examples), 1)
    return {"exact_match": em / n, "f1": f1 / n, "n": len(examples)}
