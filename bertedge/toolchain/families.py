"""The encoder families bertedge fine-tunes, exports and serves, as data.

A family is keyed by the `model_type` in a model folder's config.json. Each record says what
the ONNX graph takes (token_type_ids or not), which tokenizer kind its checkpoints ship in
tokenizer.json, how its position table limits a window, what onnxruntime's transformer
optimizer fuses in it, and whether dynamic INT8 holds up. The fusion and INT8 facts were
measured on 2-layer random models with the pinned torch 2.13 / transformers 4.57 /
onnxruntime 1.32 (`tests/test_families.py` re-checks every one of them), so a change in any
of those libraries shows up as a failing test rather than as a silent slowdown.

Stdlib and bertedge.runtime.meta only: `finetune` consults it before it loads torch weights or trains anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from bertedge.errors import BertedgeError
from bertedge.runtime.meta import read_config


class TokenizerKind(str, Enum):
    """How a family's tokenizer.json splits words (all run through the `tokenizers` library)."""

    WORDPIECE = "wordpiece"  # '##' continuation pieces (BERT, DistilBERT, ELECTRA, MPNet)
    BPE = "bpe"  # byte-level BPE: a word after a space starts with 'Ġ' (RoBERTa, ModernBERT)
    UNIGRAM = "unigram"  # SentencePiece Unigram: a word starts with '▁' (XLM-R, DeBERTa-v3)


ALL_TASKS = ("classification", "ner", "qa")
# Training and predict both encode whitespace words pre-split (bertedge.runtime.tasks.ner).
NER_ALIGNMENT = {
    TokenizerKind.WORDPIECE: "first sub-word of each word; later '##' pieces are ignored",
    TokenizerKind.BPE: "first sub-word; words after the first get their leading space back ('Ġ'), "
                       "as in running text, and offsets are mapped back onto the word",
    TokenizerKind.UNIGRAM: "first sub-word; every word starts with '▁' (or a bare '▁' piece)",
}


@dataclass(frozen=True)
class Family:
    """One encoder architecture and what each bertedge stage gets for it."""

    model_type: str
    """config.json `model_type`."""
    name: str
    """Display name."""
    tokenizer: TokenizerKind
    """The tokenizer kind its checkpoints ship."""
    token_type_ids: bool
    """forward() takes segment ids; the graph gets them only when config.type_vocab_size >= 2."""
    offset_positions: bool
    """Position ids start after padding_idx, so the table holds pad_token_id + 1 fewer tokens."""
    fused: tuple[str, ...]
    """Operators onnxruntime's transformer optimizer fuses in a 2-layer model of this family."""
    attention_fused: bool
    """Self-attention becomes one `Attention` op (the bulk of the fused speed-up)."""
    optimizer_type: str = "bert"
    """`model_type` for onnxruntime.transformers.optimizer.optimize_model (its `bert` path
    covers every family here; what it cannot match stays unfused)."""
    int8_dynamic: bool = True
    """Dynamic INT8 keeps label agreement with PyTorch (tiny-model check; real models vary)."""
    tasks: tuple[str, ...] = ALL_TASKS
    """bertedge tasks with a Hugging Face head for this family."""
    exportable: bool = True
    """torch.onnx.export(dynamo=False) at opset 17 matches PyTorch."""
    blocker: str = ""
    """Why it cannot be exported, when it cannot."""
    note: str = ""
    """What differs from BERT, in a phrase."""

    @property
    def ner_alignment(self) -> str:
        """How NER puts a word's tag on its first sub-word, for this tokenizer kind."""
        return NER_ALIGNMENT[self.tokenizer]

    def input_names(self, type_vocab_size: int) -> list[str]:
        """The graph's inputs: token_type_ids only where the model can tell segments apart.

        >>> family("roberta").input_names(1), family("bert").input_names(2)
        (['input_ids', 'attention_mask'], ['input_ids', 'attention_mask', 'token_type_ids'])
        """
        names = ["input_ids", "attention_mask"]
        return names + ["token_type_ids"] if self.token_type_ids and type_vocab_size >= 2 else names


_BERT_FUSED = ("EmbedLayerNormalization", "Attention", "BiasGelu", "SkipLayerNormalization")
_ROBERTA_FUSED = ("Attention", "BiasGelu", "SkipLayerNormalization", "LayerNormalization")  # no embedding fusion

FAMILIES: tuple[Family, ...] = (
    Family("bert", "BERT", TokenizerKind.WORDPIECE, token_type_ids=True, offset_positions=False,
           fused=_BERT_FUSED, attention_fused=True,
           note="the reference: MiniLM, BERT-base and their fine-tunes"),
    Family("distilbert", "DistilBERT", TokenizerKind.WORDPIECE, token_type_ids=False, offset_positions=False,
           fused=_BERT_FUSED, attention_fused=True,
           note="no token_type_ids"),
    Family("roberta", "RoBERTa", TokenizerKind.BPE, token_type_ids=True, offset_positions=True,
           fused=_ROBERTA_FUSED, attention_fused=True,
           note="one token type (none fed); position ids from input_ids keep the embeddings unfused"),
    Family("xlm-roberta", "XLM-RoBERTa", TokenizerKind.UNIGRAM, token_type_ids=True, offset_positions=True,
           fused=_ROBERTA_FUSED, attention_fused=True,
           note="RoBERTa's graph with a multilingual SentencePiece vocabulary"),
    Family("electra", "ELECTRA", TokenizerKind.WORDPIECE, token_type_ids=True, offset_positions=False,
           attention_fused=True, fused=(*_BERT_FUSED, "Gelu"),
           note="discriminator checkpoints; a factorised embedding is projected to the hidden size"),
    Family("mpnet", "MPNet", TokenizerKind.WORDPIECE, token_type_ids=False, offset_positions=True,
           attention_fused=False,
           fused=("BiasGelu", "SkipLayerNormalization"),
           note="relative position bias in every attention block: attention stays unfused; on the real "
                "all-mpnet-base-v2 plain dynamic INT8 collapses and the search's per-token MatMul recipe holds"),
    Family("deberta-v2", "DeBERTa-v2 / v3", TokenizerKind.UNIGRAM, token_type_ids=True, offset_positions=False,
           attention_fused=False,
           fused=("BiasGelu", "SkipLayerNormalization", "LayerNormalization", "Gelu"),
           note="disentangled attention stays unfused; v3 has no token types (type_vocab_size 0)"),
    Family("modernbert", "ModernBERT", TokenizerKind.BPE, token_type_ids=False, offset_positions=False,
           attention_fused=False,
           fused=("Gelu", "LayerNormalization", "SkipLayerNormalization"),
           note="rotary positions, local/global attention and GLU MLPs: attention stays unfused"),
)


def families() -> dict[str, Family]:
    """config.json model_type -> family record."""
    return {f.model_type: f for f in FAMILIES}


def exportable_types() -> list[str]:
    """The model types `bertedge export` accepts."""
    return [f.model_type for f in FAMILIES if f.exportable]


def family(model_type: str, where: str = "config.json") -> Family:
    """The family of `model_type`, or one BertedgeError listing the supported ones.

    Raises:
        BertedgeError: the model type is not an encoder family bertedge knows.
    """
    found = families().get(model_type)
    if found is None:
        raise BertedgeError(
            f"model_type '{model_type}' in {where} is not supported (not a known encoder family)",
            f"use a model of one of: {', '.join(exportable_types())}",
        )
    return found


def check_exportable(model_dir: Path, task: str) -> Family:
    """Refuse, before any training, a model that `bertedge export` could not ship.

    Raises:
        BertedgeError: unknown model type, a family that cannot be exported (with the reason),
            or a task this family has no head for.
    """
    where = str(model_dir / "config.json")
    found = family(read_config(model_dir).model_type, where)
    if not found.exportable:
        raise BertedgeError(
            f"{found.name} ({where}) cannot be exported to ONNX: {found.blocker}",
            f"fine-tune one of: {', '.join(exportable_types())}",
        )
    if task not in found.tasks:
        raise BertedgeError(f"{found.name} has no {task} head in transformers",
                            f"use --task {' or '.join(found.tasks)}, or another model")
    return found
