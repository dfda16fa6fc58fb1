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
from bertedge.runtime.data import BadRows, Columns, read_text
from bertedge.runtime.features import Features
from bertedge.runtime.metrics import softmax
from bertedge.runtime.records import Pair
from bertedge.runtime.tasks import (
    MARGIN_MASK,
    Arrays,
    DecodeOptions,
    Result,
    Schema,
    Task,
    WindowOutputs,
)


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


def span_margin(outputs: Arrays, feeds: Arrays, max_answer_tokens: int = 30) -> np.ndarray:
    """Per row (one window): the best span's score minus the runner-up's, a span's score being
    P(start) x P(end) with both softmaxes taken over the window's context tokens (MARGIN_MASK;
    without it, the real tokens of the second sequence) and spans as `best_spans` allows them:
    start <= end, at most `max_answer_tokens` long. Unlike `best_spans` this neither merges
    spans across windows nor renormalises over the top candidates: a window's margin depends on
    that window alone. A window with one possible span has that span's score as its margin; one
    with no context token has margin 1 (it answers nothing, whatever the stage).

    >>> out = {"start_logits": np.array([[0.0, 9.0, 0.0]]), "end_logits": np.array([[0.0, 0.0, 9.0]])}
    >>> span_margin(out, {"margin_mask": np.array([[0, 1, 1]])}).round(4).tolist()  # (1, 2) leads
    [0.9996]
    >>> out["end_logits"] = np.array([[0.0, 9.0, 9.0]])  # (1, 1) and (1, 2) tie
    >>> span_margin(out, {"margin_mask": np.array([[0, 1, 1]])}).round(4).tolist()
    [0.0]
    """
    start = np.asarray(outputs["start_logits"], dtype=np.float64)
    end = np.asarray(outputs["end_logits"], dtype=np.float64)
    context = _context_mask(feeds)[:, :start.shape[1]]
    margins = np.ones(len(start))
    for row in range(len(start)):
        pos = np.flatnonzero(context[row])
        if len(pos):
            length = pos[None, :] - pos[:, None] + 1  # end - start + 1, starts down the rows
            allowed = (length >= 1) & (length <= max_answer_tokens)
            scores = np.where(allowed, np.outer(softmax(start[row, pos]), softmax(end[row, pos])), 0.0).ravel()
            top = np.partition(scores, -2)[-2:] if scores.size > 1 else np.array([0.0, scores[0]])
            margins[row] = top[1] - top[0]
    return margins


def _context_mask(feeds: Arrays) -> np.ndarray:
    if MARGIN_MASK in feeds:
        return np.asarray(feeds[MARGIN_MASK]) != 0
    mask = np.asarray(feeds["attention_mask"]) != 0
    return mask & (np.asarray(feeds["token_type_ids"]) == 1) if "token_type_ids" in feeds else mask


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


# --- the task record --------------------------------------------------------------------------


@dataclass
class QaExamples:
    """SQuAD-style examples (a list with the attributes the stages expect)."""

    items: list[QaExample]
    source: str
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> QaExamples:
        return QaExamples([self.items[i] for i in indices], self.source)


def _load(path: Path, columns: Columns, labels: Sequence[str] | None, bad_rows: BadRows) -> QaExamples:
    return QaExamples(read_squad(path), str(path))


def _split(ex: QaExamples, fraction: float, seed: int) -> tuple[QaExamples, QaExamples]:
    titles = sorted({e.title for e in ex.items})
    n_eval = max(1, int(round(len(titles) * fraction)))
    train, held = split_by_article(ex.items, n_eval, seed)
    return QaExamples(train, ex.source), QaExamples(held, ex.source)


def _encode(tok: Tokenizer, ex: QaExamples, max_length: int, stride: int) -> Features:
    configure_windows(tok, max_length, stride)
    features = encode_qa(tok, [e.question for e in ex.items], [e.context for e in ex.items],
                         [e.answers[0] if e.answers else None for e in ex.items])
    tok.no_truncation()
    return features


def _predict(outputs: WindowOutputs, features: Features, ex: QaExamples, labels: Sequence[str]) -> list[str]:
    windows: list[list[Any]] = [[] for _ in range(len(ex))]
    for w, o in enumerate(outputs):
        windows[features.example_index[w]].append((features.encodings[w], o["start_logits"], o["end_logits"]))
    answers = []
    for e, wins in zip(ex.items, windows):
        best = best_spans(wins, e.context)
        answers.append(best[0]["text"] if best else "")
    return answers


def _score(pred: list[str], ex: QaExamples, labels: Sequence[str]) -> dict[str, Any]:
    return squad_scores(pred, ex.items)


def _targets(targets: list[Any], width: int) -> dict[str, np.ndarray]:
    arr = np.asarray(targets, dtype=np.int64).reshape(-1, 2)
    return {"start_positions": arr[:, 0], "end_positions": arr[:, 1]}


def _check_item(item: Pair) -> str | None:
    return None if item[1] is not None else "a QA item needs a question and a context"


def _encode_items(tokenizer: Tokenizer, pairs: list[Pair], cap: int) -> Features:
    """(question, context) -> overlapping windows over the whole context (nothing is cut).

    Raises:
        BertedgeError: a question leaves no room for the context in a window (the tokenizer
            would fail, or panic, on it).
    """
    check_questions(tokenizer, [q for q, _ in pairs])
    return encode_qa(tokenizer, [q for q, _ in pairs], [c or "" for _, c in pairs])


def check_questions(tokenizer: Tokenizer, questions: Sequence[str]) -> None:
    """Refuse a question too long to leave at least stride + 1 context tokens in a window.

    The tokenizer (set up by `configure_windows`) raises on a question longer than the window
    and panics on one that leaves stride or fewer context tokens; a (question, "") pair is never
    truncated while it fits, so it measures the question safely.
    """
    truncation = tokenizer.truncation or {}
    window, stride = int(truncation.get("max_length", 0)), int(truncation.get("stride", 0))
    if not window:
        return
    specials = tokenizer.num_special_tokens_to_add(True)
    budget = window - specials - stride - 1
    try:
        sizes = [len(e.ids) - specials for e in tokenizer.encode_batch([(q, "") for q in questions])]
    except Exception:  # at least one question is longer than a whole window: find it
        sizes = []
        for q in questions:
            try:
                sizes.append(len(tokenizer.encode(q, "").ids) - specials)
            except Exception:
                sizes.append(window)
    for question, size in zip(questions, sizes, strict=True):
        if size > budget:
            raise BertedgeError(
                f"the question ({question[:40]!r}{'...' if len(question) > 40 else ''}) is "
                f"{'at least ' if size >= window else ''}{size} tokens; a {window}-token window "
                f"keeps {stride + 1} or more for the context",
                f"shorten the question to at most {budget} tokens (or package a model with a larger max length)")


def _decode(pairs: list[Pair], features: Features, outputs: WindowOutputs, labels: Sequence[str],
            options: DecodeOptions) -> list[Result]:
    per_item: list[list[Any]] = [[] for _ in pairs]
    for enc, owner, out in zip(features.encodings, features.example_index, outputs, strict=True):
        per_item[owner].append((enc, out["start_logits"], out["end_logits"]))
    results = []
    for (_, context), windows in zip(pairs, per_item, strict=True):
        spans = best_spans(windows, context or "", top_k=options.top_k, max_answer_tokens=options.max_answer_tokens)
        best = spans[0] if spans else {"text": "", "start": -1, "end": -1, "score": 0.0}
        result: Result = {"answer": best["text"], "start": best["start"], "end": best["end"], "score": best["score"],
                          "windows": len(windows)}
        if options.top_k > 1:
            result["answers"] = [{k: v for k, v in s.items() if k != "window"} for s in spans]
        results.append(result)
    return results


SPAN_SCHEMA: Schema = {"text": "string", "start": "int64", "end": "int64", "score": "float64"}


def _schema(labels: Sequence[str], options: DecodeOptions) -> Schema:
    schema: Schema = {"answer": "string", "start": "int64", "end": "int64", "score": "float64", "windows": "int64"}
    return {**schema, "answers": [SPAN_SCHEMA]} if options.top_k > 1 else schema


QA: Task = Task(
    name="qa",
    hf_auto_class="AutoModelForQuestionAnswering",
    hf_architecture_suffix="ForQuestionAnswering",
    output_names=("start_logits", "end_logits"),
    per_token_outputs=True,
    metric="f1",
    default_max_length=384,
    load=_load, split=_split, encode=_encode, predict=_predict, score=_score, targets=_targets,
    check_item=_check_item,
    input_columns=(("question",), ("context",)),
    setup_tokenizer=lambda tok, max_length, stride: configure_windows(tok, max_length, stride),
    encode_items=_encode_items,
    decode=_decode,
    example_item=("What is this?", "This is an example context."),
    output_schema=_schema,
    texts=lambda ex: [e.context for e in ex.items],
    items=lambda ex: [(e.question, e.context) for e in ex.items],
    margin=span_margin,
    margin_tokens=lambda enc: [1 if s == 1 else 0 for s in enc.sequence_ids],  # the context only
)
