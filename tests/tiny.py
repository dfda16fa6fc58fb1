"""Tiny random BERT / DistilBERT models and a WordPiece tokenizer, built offline in a folder."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    config: Any
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


def write_jsonl(path: Path, records: Sequence[Mapping[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- every encoder family

FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "mpnet", "deberta-v2", "modernbert")
# Tokenizer kind per family, as their real checkpoints ship it: WordPiece, byte-level BPE
# (leading-space 'Ġ' pieces) or SentencePiece Unigram (Metaspace '▁' pieces).
TOKENIZER_KIND = {"bert": "wordpiece", "distilbert": "wordpiece", "electra": "wordpiece", "mpnet": "wordpiece",
                  "roberta": "bpe", "modernbert": "bpe", "xlm-roberta": "unigram", "deberta-v2": "unigram"}
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4; pad 1, as RoBERTa / XLM-R / MPNet
DEBERTA_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # DeBERTa-v3's order


def _corpus() -> list[str]:
    """Sentences over the test words, so BPE merges and Unigram pieces cover them."""
    rng = random.Random(0)
    words = POSITIVE + NEGATIVE + NEUTRAL
    lines = [" ".join(rng.sample(words, 6)) for _ in range(300)]
    return lines + [w.capitalize() for w in words] + ["John Smith lives in Paris .", "Where ? What !", "".join(CHARS)]


def _save_fast(tok, folder: Path, fast_cls: str, specials: dict[str, str], max_length: int):  # type: ignore[no-untyped-def]
    import transformers

    fast = getattr(transformers, fast_cls)(tokenizer_object=tok, model_max_length=max_length, **specials)
    fast.save_pretrained(folder)
    return fast


# The special-token roles of RoBERTa-style tokenizers (RoBERTa, XLM-R): <s> ... </s>.
ROBERTA_NAMES = {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
                 "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}


def make_family_tokenizer(folder: Path, arch: str, max_length: int = 64):  # type: ignore[no-untyped-def]
    """Write the tokenizer kind `arch` ships with (tokenizer.json + fast tokenizer config); return it."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    folder.mkdir(parents=True, exist_ok=True)
    kind = TOKENIZER_KIND[arch]
    if arch in ("bert", "distilbert"):
        return make_tokenizer(folder, max_length)
    if kind == "wordpiece":  # ELECTRA: BERT's specials; MPNet: RoBERTa's specials and pair template
        specials = SPECIALS if arch == "electra" else ROBERTA_SPECIALS
        words = specials + [w for w in vocab() if w not in SPECIALS]
        tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token=specials[1 if arch == "electra" else 3]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        if arch == "electra":
            cls, sep, pad, unk, mask = "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"
            tok.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                special_tokens=[("[CLS]", words.index("[CLS]")), ("[SEP]", words.index("[SEP]"))])
            fast_cls = "ElectraTokenizerFast"
        else:
            cls, sep, pad, unk, mask = "<s>", "</s>", "<pad>", "<unk>", "<mask>"
            tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
            fast_cls = "MPNetTokenizerFast"
        return _save_fast(tok, folder, fast_cls, {"cls_token": cls, "sep_token": sep, "pad_token": pad,
                                                  "unk_token": unk, "mask_token": mask}, max_length)
    if kind == "bpe":  # RoBERTa: <s> A </s></s> B </s>; ModernBERT: [CLS] A [SEP] B [SEP]
        specials = ROBERTA_SPECIALS if arch == "roberta" else ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(), trainer)
        if arch == "roberta":
            tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                              add_prefix_space=False)
            return _save_fast(tok, folder, "RobertaTokenizerFast", ROBERTA_NAMES, max_length)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 0), ("[SEP]", 1)])
        names = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                 "mask_token": "[MASK]"}
        return _save_fast(tok, folder, "PreTrainedTokenizerFast", names, max_length)
    # SentencePiece Unigram through tokenizer.json: XLM-R's and DeBERTa-v3's pieces start with '▁'
    specials = ROBERTA_SPECIALS if arch == "xlm-roberta" else DEBERTA_SPECIALS
    unk = "<unk>" if arch == "xlm-roberta" else "[UNK]"
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token=unk, show_progress=False,
                                      initial_alphabet=CHARS)
    tok.train_from_iterator(_corpus(), trainer)
    if arch == "xlm-roberta":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
        return _save_fast(tok, folder, "XLMRobertaTokenizerFast", ROBERTA_NAMES, max_length)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    names = {"bos_token": "[CLS]", "eos_token": "[SEP]", "cls_token": "[CLS]", "sep_token": "[SEP]",
             "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}
    return _save_fast(tok, folder, "DebertaV2TokenizerFast", names, max_length)


def family_config(arch: str, vocab_size: int, pad: int, labels: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """A 2-layer, hidden-32 config of `arch` shaped like its real checkpoints (positions, type ids)."""
    import transformers

    id2label = {i: lab for i, lab in enumerate(labels)}
    common: dict[str, Any] = dict(vocab_size=vocab_size, id2label=id2label, label2id={lab: i for i, lab in id2label.items()},
                  pad_token_id=pad)
    layers = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    if arch in ("roberta", "xlm-roberta"):  # positions start after padding_idx: 128 tokens need 130
        cls = transformers.RobertaConfig if arch == "roberta" else transformers.XLMRobertaConfig
        return cls(max_position_embeddings=130, type_vocab_size=1, bos_token_id=0, eos_token_id=2, **layers, **common)
    if arch == "electra":  # the discriminator's factorised embeddings: 16 -> projected to 32
        return transformers.ElectraConfig(embedding_size=16, max_position_embeddings=128, **layers, **common)
    if arch == "mpnet":
        return transformers.MPNetConfig(max_position_embeddings=130, relative_attention_num_buckets=32,
                                        bos_token_id=0, eos_token_id=2, **layers, **common)
    if arch == "deberta-v2":  # DeBERTa-v3's settings: relative attention only, no token types
        return transformers.DebertaV2Config(
            max_position_embeddings=128, relative_attention=True, position_buckets=32, max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
            type_vocab_size=0, pooler_hidden_size=32, **layers, **common)
    if arch == "modernbert":
        return transformers.ModernBertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=16,
            cls_token_id=0, sep_token_id=1, bos_token_id=0, eos_token_id=1, **common)
    raise ValueError(arch)


def make_family_model(folder: Path, arch: str, task: str = "classification",
                      labels: tuple[str, ...] = ("negative", "positive"), seed: int = 0,
                      max_length: int = 64) -> Path:
    """Save a tiny random `arch` model (any of FAMILIES) with the requested head and its tokenizer."""
    if arch in ("bert", "distilbert"):
        return make_tiny_model(folder, arch, task, labels, seed, max_length)
    import torch
    import transformers

    torch.manual_seed(seed)
    fast = make_family_tokenizer(folder, arch, max_length)
    config = family_config(arch, len(fast), int(fast.pad_token_id), labels)
    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "ner": transformers.AutoModelForTokenClassification,
            "qa": transformers.AutoModelForQuestionAnswering}[task]
    auto.from_config(config).save_pretrained(folder)
    return folder
