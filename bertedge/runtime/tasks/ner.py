"""Token classification (NER): CoNLL / JSONL reading, IOB2 checks, sub-word alignment,
entity grouping into character spans, and entity-level precision / recall / F1.

Numpy + tokenizers only: the runtime uses the grouping, training uses all of it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bertedge.errors import BertedgeError
from bertedge.runtime.data import BadRows, Columns, read_text, seeded_split
from bertedge.runtime.features import IGNORE, Features
from bertedge.runtime.metrics import softmax
from bertedge.runtime.records import Pair
from bertedge.runtime.tasks import (
    Aggregation,
    Arrays,
    DecodeOptions,
    Result,
    Schema,
    Task,
    WindowOutputs,
    scored_mask,
    top_two_margin,
)
from bertedge.runtime.tasks.classification import truncate_at

__all__ = ["Aggregation", "NER", "NerExamples", "read_ner"]  # Aggregation: re-exported for callers of ner.*


@dataclass
class NerExamples:
    """Sentences as words with tag indices into `label_names`."""

    words: list[list[str]]
    tags: list[list[int]] | None
    label_names: list[str]
    source: str
    lines: list[int]  # line of each sentence's first word (for messages)

    def __len__(self) -> int:
        return len(self.words)

    def subset(self, indices: Sequence[int]) -> NerExamples:
        return NerExamples([self.words[i] for i in indices],
                           [self.tags[i] for i in indices] if self.tags is not None else None,
                           self.label_names, self.source, [self.lines[i] for i in indices])


def read_ner(path: Path, label_names: Sequence[str] | None = None) -> NerExamples:
    """Read CoNLL-style `token<TAB>tag` lines (blank line between sentences) or JSONL
    `{"tokens": [...], "tags": [...]}`, checking every tag is IOB2.

    Raises:
        BertedgeError: naming the file and line of a column mismatch or an IOB2 violation.
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise BertedgeError(f"{path} is empty", "give CoNLL `token<TAB>tag` lines or JSONL {tokens, tags}")
    if path.suffix.lower() in (".jsonl", ".json"):
        sentences = list(_jsonl_sentences(path, text))
    else:
        sentences = list(_conll_sentences(path, text))
    for _words, tags, lines in sentences:
        check_iob2(tags, path, lines)
    names = list(label_names) if label_names else _label_set(t for _, t, _ in sentences)
    index = {n: i for i, n in enumerate(names)}
    tag_ids = []
    for _, tags, lines in sentences:
        for tag, line in zip(tags, lines):
            if tag not in index:
                raise BertedgeError(f"{path}: line {line}: tag '{tag}' is not one of the model's tags: {', '.join(names)}",
                                    "use the training tag set")
        tag_ids.append([index[t] for t in tags])
    return NerExamples([w for w, _, _ in sentences], tag_ids, names, str(path), [ln[0] for _, _, ln in sentences])


def _conll_sentences(path: Path, text: str) -> Any:
    words: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    for n, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            if words:
                yield words, tags, lines
            words, tags, lines = [], [], []
            continue
        if line.startswith("-DOCSTART-"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2 or not parts[0] or not parts[-1]:
            raise BertedgeError(f"{path}: line {n}: expected `token<TAB>tag`, got {line[:60]!r}",
                                "write one token and its IOB2 tag per line, a blank line between sentences")
        words.append(parts[0])
        tags.append(parts[-1])
        lines.append(n)
    if words:
        yield words, tags, lines


def _jsonl_sentences(path: Path, text: str) -> Any:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            words, tags = rec["tokens"], rec["tags"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BertedgeError(f"{path}: line {n} is not a JSON object with 'tokens' and 'tags'",
                                'write {"tokens": [...], "tags": [...]} per line') from None
        if len(words) != len(tags):
            raise BertedgeError(f"{path}: line {n}: {len(words)} tokens but {len(tags)} tags",
                                "give exactly one tag per token")
        if not words:
            raise BertedgeError(f"{path}: line {n}: empty sentence", "remove the line")
        yield [str(w) for w in words], [str(t) for t in tags], [n] * len(words)


def check_iob2(tags: Sequence[str], path: Path | str = "<tags>", lines: Sequence[int] | None = None) -> None:
    """Raise on a tag that is not O, B-X or I-X, or an I-X that does not continue B-X / I-X.

    >>> check_iob2(["B-PER", "I-PER", "O", "B-LOC"])
    >>> check_iob2(["O", "I-PER"])
    Traceback (most recent call last):
    ...
    bertedge.errors.BertedgeError: <tags>: line 2: tag 'I-PER' follows 'O'; IOB2 starts every entity with B-PER -- convert the file to IOB2 (e.g. IOB1 -> IOB2) or fix that tag
    """
    prev = "O"
    for i, tag in enumerate(tags):
        line = lines[i] if lines else i + 1
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise BertedgeError(f"{path}: line {line}: tag '{tag}' is not IOB2 (O, B-TYPE or I-TYPE)",
                                "convert the tags to IOB2")
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            raise BertedgeError(f"{path}: line {line}: tag '{tag}' follows '{prev}'; IOB2 starts every entity with B-{tag[2:]}",
                                "convert the file to IOB2 (e.g. IOB1 -> IOB2) or fix that tag")
        prev = tag


def _label_set(tag_lists: Any) -> list[str]:
    """O first, then B-/I- per type, types sorted: a stable label order."""
    types = sorted({t[2:] for tags in tag_lists for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def encode_words(tokenizer: Tokenizer, examples: NerExamples, max_length: int) -> Features:
    """Tokenize pre-split words; label the first sub-word of each word, ignore the rest."""
    tokenizer.enable_truncation(max_length)
    encodings = tokenizer.encode_batch(spaced_words(tokenizer, examples.words), is_pretokenized=True)
    tokenizer.no_truncation()
    targets = None
    if examples.tags is not None:
        targets = [align_labels(enc.word_ids, tags) for enc, tags in zip(encodings, examples.tags)]
    truncated = [bool(enc.overflowing) for enc in encodings]  # a word with no tokens (U+200B) is no cut
    return Features(encodings, list(range(len(encodings))), targets, truncated)


def spaced_words(tokenizer: Tokenizer, words: list[list[str]]) -> list[list[str]]:
    """Pre-split words as the tokenizer sees them in running text, so training and predict agree.

    Byte-level BPE (RoBERTa, ModernBERT) marks a word that follows a space with a leading 'Ġ',
    but pre-split words carry no space: every word would be tokenized like a sentence start,
    unlike the raw text `predict` gets. For such tokenizers each word after the first gets its
    space back; WordPiece and SentencePiece ('▁' on every word) come back unchanged.
    """
    raw = tokenizer.encode("a b", add_special_tokens=False).tokens
    if tokenizer.encode(["a", "b"], is_pretokenized=True, add_special_tokens=False).tokens == raw:
        return words
    return [[w if i == 0 else " " + w for i, w in enumerate(sentence)] for sentence in words]


def align_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """Per-token labels: a word's tag on its first sub-token, IGNORE elsewhere.

    >>> align_labels([None, 0, 1, 1, None], [3, 5])
    [-100, 3, 5, -100, -100]
    """
    out, prev = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == prev else int(tags[w]))
        prev = w
    return out


WORD = re.compile(r"\S+")


def split_words(text: str) -> tuple[list[str], list[int]]:
    """Whitespace-separated words and their character starts: the words NER trains on.

    >>> split_words("John  Smith, Paris.")
    (['John', 'Smith,', 'Paris.'], [0, 6, 13])
    """
    found = list(WORD.finditer(text))
    return [m.group() for m in found], [m.start() for m in found]


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> Features:
    """Runtime input: raw texts split into whitespace words and encoded pre-split, as training
    encodes CoNLL words (the tokenizer must already truncate at the model's max length).

    Training labels only the first sub-token of each word, so the model's predictions for the
    other sub-tokens are untrained: a raw-text encoding would make "U.S." or "1-0" several
    words, each labelled from such a sub-token. Word ids index the whitespace words; offsets
    (relative to each word for pre-split input) are made absolute with `absolute_offsets`.
    """
    words = [split_words(t)[0] or [t] for t in texts]
    encodings = tokenizer.encode_batch(spaced_words(tokenizer, words), is_pretokenized=True)
    truncated = [bool(e.overflowing) for e in encodings]
    return Features(encodings, list(range(len(encodings))), None, truncated)


def absolute_offsets(text: str, word_ids: Sequence[int | None],
                     offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans in `text` of a pre-split encoding's tokens (special tokens: (0, 0)).

    A word given back its leading space by `spaced_words` has offsets relative to " word": its
    last token ends one past the word, so that word's offsets move back by one (the space
    itself maps to an empty span at the word's start).
    """
    words, starts = split_words(text)
    starts = starts or [0]
    ends: dict[int, int] = {}
    for w, (_, b) in zip(word_ids, offsets, strict=True):
        if w is not None:
            ends[w] = max(ends.get(w, 0), b)
    shift = {w: int(bool(words) and end > len(words[w])) for w, end in ends.items()}
    return [(starts[w] + max(a - shift[w], 0), starts[w] + max(b - shift[w], 0)) if w is not None else (0, 0)
            for w, (a, b) in zip(word_ids, offsets, strict=True)]


def word_predictions(logits: np.ndarray, word_ids: Sequence[int | None],
                     strategy: Aggregation) -> dict[int, tuple[int, float]]:
    """word index -> (label id, score) from one window's (tokens, labels) logits."""
    probs = softmax(logits.astype(np.float64), axis=-1)
    tokens_of: dict[int, list[int]] = {}
    for t, w in enumerate(word_ids):
        if w is not None:
            tokens_of.setdefault(w, []).append(t)
    out = {}
    for w, toks in tokens_of.items():
        if strategy in (Aggregation.FIRST, Aggregation.SIMPLE):
            p = probs[toks[0]]
        elif strategy is Aggregation.MAX:
            p = probs[max(toks, key=lambda t: probs[t].max())]
        else:
            p = probs[toks].mean(axis=0)
        out[w] = (int(p.argmax()), float(p.max()))
    return out


def group_entities(text: str, logits: np.ndarray, word_ids: Sequence[int | None],
                   offsets: Sequence[tuple[int, int]], labels: Sequence[str],
                   strategy: Aggregation = Aggregation.FIRST) -> list[dict[str, Any]]:
    """Entities with type, character start/end in `text`, surface text and mean score.

    B-X starts an entity, I-X continues an open entity of type X (an I-X after anything else
    starts a new one, as Hugging Face pipelines do); sub-words never split an entity except
    with the `simple` strategy, which groups sub-tokens by their own tags.
    """
    if strategy is Aggregation.SIMPLE:
        probs = softmax(logits.astype(np.float64), axis=-1)
        units = [(int(probs[t].argmax()), float(probs[t].max()), offsets[t])
                 for t, w in enumerate(word_ids) if w is not None]
    else:
        words = word_predictions(logits, word_ids, strategy)
        spans: dict[int, list[int]] = {}
        for t, w in enumerate(word_ids):
            if w is not None:
                spans.setdefault(w, [offsets[t][0], offsets[t][1]])[1] = offsets[t][1]
        units = [(words[w][0], words[w][1], (spans[w][0], spans[w][1])) for w in sorted(words)]
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for label_id, score, (start, end) in units:
        tag = labels[label_id]
        kind = tag[2:] if tag != "O" else None
        if kind and tag.startswith("I-") and current and current["type"] == kind:
            current["end"] = end
            current["scores"].append(score)
            continue
        if current:
            entities.append(current)
        current = {"type": kind, "start": start, "end": end, "scores": [score]} if kind else None
    if current:
        entities.append(current)
    return [{"type": e["type"], "start": int(e["start"]), "end": int(e["end"]), "text": text[e["start"]:e["end"]],
             "score": float(np.mean(e["scores"]))} for e in entities]


def tag_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """IOB2-strict entity spans (type, first word, last word); an orphan I- is not an entity.

    >>> sorted(tag_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "B-LOC"]))
    [('LOC', 4, 4), ('LOC', 5, 5), ('PER', 0, 1)]
    """
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if kind is not None and not (tag.startswith("I-") and tag[2:] == kind):
            spans.add((kind, start, i - 1))
            kind = None
        if tag.startswith("B-"):
            start, kind = i, tag[2:]
    return spans  # type: ignore[return-value]


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision / recall / F1 per type and micro-averaged (seqeval strict IOB2).

    >>> entity_scores([["B-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])["f1"]
    1.0
    """
    counts: dict[str, list[int]] = {}  # type -> [true positives, predicted, gold]
    for g, p in zip(gold, pred):
        gs, ps = tag_spans(g), tag_spans(p)
        for kind, *_ in gs | ps:
            counts.setdefault(kind, [0, 0, 0])
        for span in ps:
            counts[span[0]][1] += 1
            counts[span[0]][0] += span in gs
        for span in gs:
            counts[span[0]][2] += 1
    per_type = {k: _prf(*v) for k, v in sorted(counts.items())}
    total = [sum(v[i] for v in counts.values()) for i in range(3)]
    micro = _prf(*total)
    return {"f1": micro["f1"], "precision": micro["precision"], "recall": micro["recall"],
            "per_type": per_type, "n_sentences": len(gold)}


def _prf(tp: int, predicted: int, gold: int) -> dict[str, float | int]:
    p = tp / predicted if predicted else 0.0
    r = tp / gold if gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": gold}


def word_tags(window_logits: np.ndarray, word_ids: Sequence[int | None], n_words: int,
              labels: Sequence[str]) -> list[str]:
    """Predicted IOB2 tag per word (first sub-token), 'O' for words cut off by truncation."""
    words = word_predictions(window_logits, word_ids, Aggregation.FIRST)
    return [labels[words[w][0]] if w in words else "O" for w in range(n_words)]


# --- the task record --------------------------------------------------------------------------


def _load(path: Path, columns: Columns, labels: Sequence[str] | None, bad_rows: BadRows) -> NerExamples:
    return read_ner(path, labels)


def _split(ex: NerExamples, fraction: float, seed: int) -> tuple[NerExamples, NerExamples]:
    return seeded_split(ex, fraction, seed)


def _encode(tok: Tokenizer, ex: NerExamples, max_length: int, stride: int) -> Features:
    return encode_words(tok, ex, max_length)


def _predict(outputs: WindowOutputs, features: Features, ex: NerExamples, labels: Sequence[str]) -> list[list[str]]:
    return [word_tags(o["logits"], features.encodings[i].word_ids, len(ex.words[i]), labels)
            for i, o in enumerate(outputs)]


def _score(pred: list[list[str]], ex: NerExamples, labels: Sequence[str]) -> dict[str, Any]:
    assert ex.tags is not None
    gold = [[labels[t] for t in tags] for tags in ex.tags]
    return entity_scores(gold, pred)


def _targets(targets: list[Any], width: int) -> dict[str, np.ndarray]:
    out = np.full((len(targets), width), IGNORE, dtype=np.int64)
    for row, t in enumerate(targets):
        out[row, :len(t)] = t
    return {"labels": out}


def _check_item(item: Pair) -> str | None:
    return "this model takes one text, not a pair" if item[1] is not None else None


def _encode_items(tokenizer: Tokenizer, pairs: list[Pair], cap: int) -> Features:
    """Texts (cut at `cap` characters first) as whitespace words, encoded as training does."""
    features = encode_texts(tokenizer, [text[:cap] for text, _ in pairs])
    features.truncated = [t or len(text) > cap for t, (text, _) in zip(features.truncated, pairs, strict=True)]
    return features


def _decode(pairs: list[Pair], features: Features, outputs: WindowOutputs, labels: Sequence[str],
            options: DecodeOptions) -> list[Result]:
    results = []
    for (text, _), enc, out in zip(pairs, features.encodings, outputs, strict=True):
        entities = group_entities(text, out["logits"], enc.word_ids, absolute_offsets(text, enc.word_ids, enc.offsets),
                                  labels, options.aggregation)
        results.append({"entities": [trim_entity(text, e) for e in entities]})
    return results


def token_margin(outputs: Arrays, feeds: Arrays) -> np.ndarray:
    """Per row: the smallest top-1 minus top-2 tag probability over the row's scored tokens
    (MARGIN_MASK: the words' sub-tokens, no specials; without it, every real token). One unsure
    token escalates the text; a row with no scored token has margin 1.

    >>> logits = np.array([[[9.0, 0.0], [0.0, 0.0], [9.0, 0.0]]])  # token 1 is a coin flip
    >>> token_margin({"logits": logits}, {"attention_mask": np.array([[1, 1, 1]])}).round(4).tolist()
    [0.0]
    >>> token_margin({"logits": logits}, {"attention_mask": np.array([[1, 1, 1]]),
    ...                                   "margin_mask": np.array([[1, 0, 1]])}).round(4).tolist()
    [0.9998]
    """
    gaps = top_two_margin(outputs["logits"])
    mask = scored_mask(feeds)[:, :gaps.shape[1]]
    return np.where(mask, gaps, 1.0).min(axis=1, initial=1.0)


def is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def trim_entity(text: str, entity: dict[str, Any]) -> dict[str, Any]:
    """Drop punctuation stuck to an entity's outer words ("Paris," -> "Paris") unless the
    entity has punctuation inside ("U.S.", "1-0", "O'Neil" stay whole).

    Words are whitespace-separated, as in training, so "Paris," is one word; the span is cut
    back to what a reader calls the entity.

    >>> trim_entity("in Paris, now", {"start": 3, "end": 9, "text": "Paris,"})["text"]
    'Paris'
    >>> trim_entity("the U.S. team", {"start": 4, "end": 8, "text": "U.S."})["text"]
    'U.S.'
    """
    start, end = entity["start"], entity["end"]
    while start < end and is_punctuation(text[start]):
        start += 1
    while end > start and is_punctuation(text[end - 1]):
        end -= 1
    if start == end or any(is_punctuation(ch) for ch in text[start:end]):
        return entity
    return {**entity, "start": start, "end": end, "text": text[start:end]}


ENTITY_SCHEMA: Schema = {"type": "string", "start": "int64", "end": "int64", "text": "string", "score": "float64"}


def _schema(labels: Sequence[str], options: DecodeOptions) -> Schema:
    return {"entities": [ENTITY_SCHEMA]}


NER: Task = Task(
    name="ner",
    hf_auto_class="AutoModelForTokenClassification",
    hf_architecture_suffix="ForTokenClassification",
    output_names=("logits",),
    per_token_outputs=True,
    metric="f1",
    default_max_length=128,
    load=_load, split=_split, encode=_encode, predict=_predict, score=_score, targets=_targets,
    check_item=_check_item,
    input_columns=None,
    setup_tokenizer=truncate_at,
    encode_items=_encode_items,
    decode=_decode,
    example_item=("John Smith lives in Paris .", None),
    output_schema=_schema,
    texts=lambda ex: [" ".join(words) for words in ex.words],
    items=lambda ex: [(" ".join(words), None) for words in ex.words],
    margin=token_margin,
    margin_tokens=lambda enc: [0 if w is None else 1 for w in enc.word_ids],  # specials: no word
)
