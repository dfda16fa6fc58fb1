"""Tiny random BERT / DistilBERT models and a WordPiece tokenizer, built offline in a folder."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "lovely", "fun", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "poor", "ugly", "tedious"]
NEUTRAL = ["the", "a", "film", "movie", "plot", "was", "is", "and", "very", "acting", "story",
           "john", "smith", "lives", "in", "paris", "works", "at", "acme", "corp", "who", "where",
           "what", "when", "city", "born", "france", "team", "question", "answer", "on", "of"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-éàü")


def vocab() -> list[str]:
    """Whole words plus every character as a word start and a continuation piece."""
    words = SPECIALS + POSITIVE + NEGATIVE + NEUTRAL + CHARS + ["##" + c for c in CHARS]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def make_tokenizer(folder: Path, max_length: int = 64):  # type: ignore[no-untyped-def]
    """Write a BERT-style fast tokenizer (tokenizer.json + vocab.txt) into folder; return it."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    v = vocab()
    (folder / "vocab.txt").write_text("\n".join(v) + "\n", encoding="utf-8")
    tok = Tokenizer(WordPiece({w: i for i, w in enumerate(v)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = v.index("[CLS]"), v.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=max_length,
                             unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: Path, arch: str = "bert", task: str = "classification",
                    labels: tuple[str, ...] = ("negative", "positive"), seed: int = 0,
                    max_length: int = 64) -> Path:
    """Save a tiny random model with the requested head and a tokenizer into folder."""
    import torch
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        BertConfig,
        DistilBertConfig,
    )

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder, max_length)
    id2label = {i: lab for i, lab in enumerate(labels)}
    label2id = {lab: i for i, lab in id2label.items()}
    common = dict(vocab_size=len(vocab()), max_position_embeddings=128, id2label=id2label,
                  label2id=label2id, pad_token_id=0)
    if arch == "bert":
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=37, **common)
    elif arch == "distilbert":
        config = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, **common)
    else:
        raise ValueError(arch)
    auto = {"classification": AutoModelForSequenceClassification,
            "ner": AutoModelForTokenClassification,
            "qa": AutoModelForQuestionAnswering}[task]
    model = auto.from_config(config)
    model.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Synthetic, learnable sentiment sentences: positive words -> 1, negative words -> 0."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        cue = rng.choice(POSITIVE if label else NEGATIVE)
        filler = rng.sample(NEUTRAL[:11], 4)
        words = filler[:2] + [cue] + filler[2:]
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, int]], text_col: str = "text",
              label_col: str = "label", delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow([text_col, label_col])
        w.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
