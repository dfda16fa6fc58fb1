"""Every encoder family through finetune -> export -> package -> predict, on tiny random models.

Each family's tiny model is built from its own config class with the tokenizer kind its real
checkpoints ship (WordPiece, byte-level BPE, SentencePiece Unigram), and the facts recorded in
`bertedge.toolchain.families` (graph inputs, fused operators, INT8, position limits) are checked
against what the pinned torch / transformers / onnxruntime actually do.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import (
    FAMILIES,
    make_family_model,
    make_family_tokenizer,
    sentiment_rows,
    write_csv,
    write_jsonl,
)

from bertedge.errors import BertedgeError
from bertedge.runtime.bundle import PackageArgs, package
from bertedge.runtime.features import load_tokenizer
from bertedge.runtime.meta import position_limit, read_model_meta
from bertedge.runtime.predictor import Predictor
from bertedge.runtime.tasks import ner, qa
from bertedge.toolchain import families as fam
from bertedge.toolchain.export import SUPPORTED_MODEL_TYPES, ExportArgs, ExportReport, export
from bertedge.toolchain.finetune import FinetuneArgs, _layer_depth, finetune
from bertedge.toolchain.models import REGISTRY

NER_LABELS = ("O", "B-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER")
NER_SENTENCES = [
    [("john", "B-PER"), ("smith", "I-PER"), ("lives", "O"), ("in", "O"), ("paris", "B-LOC")],
    [("acme", "B-ORG"), ("corp", "I-ORG"), ("is", "O"), ("in", "O"), ("france", "B-LOC")],
    [("the", "O"), ("team", "O"), ("works", "O"), ("at", "O"), ("acme", "B-ORG")],
    [("john", "B-PER"), ("was", "O"), ("born", "O"), ("in", "O"), ("paris", "B-LOC"), (".", "O")],
]
QA_CONTEXT = "john smith lives in paris and works at acme corp"
QA_ROWS = [("where does john live ?", "paris"), ("who lives in paris ?", "john smith"),
           ("where does john work ?", "acme corp")]
TEXTS = ["a good film", "the plot was very dull and the acting was poor", "superb", "boring movie",
         "John Smith lives in Paris.", "the acting was great and the story was fun"]
# NER and QA for every family run with -m slow; the default run covers one BPE and one
# Unigram family besides the BERT-family tests in test_tasks.py.
DEFAULT_SEQUENCE_TASK_FAMILIES = ("roberta", "deberta-v2")
TASK_METRIC = {"classification": "accuracy", "ner": "f1", "qa": "f1"}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    """Finetune runs with threads=1 (tiny ops thrash on a shared machine); put the setting back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_registry_covers_every_family() -> None:
    assert [f.model_type for f in fam.FAMILIES] == list(FAMILIES)
    assert SUPPORTED_MODEL_TYPES == {t: "bert" for t in FAMILIES}
    assert all(m.architecture in fam.families() for m in REGISTRY)
    for f in fam.FAMILIES:
        assert f.exportable and not f.blocker and f.tasks == fam.ALL_TASKS
        assert ("Attention" in f.fused) == f.attention_fused
        assert f.ner_alignment.startswith("first sub-word")


@pytest.mark.parametrize("arch", FAMILIES)
def test_position_limit_is_what_the_model_takes(arch: str, tmp_path: Path) -> None:
    """position_limit(config) tokens run; one more fails where positions are absolute."""
    from transformers import AutoConfig, AutoModel

    make_family_model(tmp_path, arch)
    config = json.loads((tmp_path / "config.json").read_text())
    limit = position_limit(config)
    f = fam.family(config["model_type"])
    table = config["max_position_embeddings"]
    assert limit == table - (config["pad_token_id"] + 1 if f.offset_positions else 0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(tmp_path)).eval()
    ids = torch.full((1, limit), 5)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        if arch in ("deberta-v2", "modernbert"):  # relative / rotary positions: no hard table
            return
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 5), attention_mask=torch.ones((1, limit + 1), dtype=torch.long))


@pytest.mark.parametrize("arch", ["bert", "mpnet", "roberta", "modernbert", "xlm-roberta", "deberta-v2"])
def test_ner_words_tokenize_like_running_text(arch: str, tmp_path: Path) -> None:
    """Training's pre-split words must give the pieces predict gets from raw text (BPE's 'Ġ')."""
    make_family_tokenizer(tmp_path, arch)
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    words = ["John", "Smith", "lives", "in", "Paris", "."]
    trained = ner.encode_words(tok, ner.NerExamples([words], [[0] * 6], list(NER_LABELS), "t", [1]), 64)
    served = ner.encode_texts(tok, [" ".join(words)])
    assert trained.encodings[0].tokens == served.encodings[0].tokens
    assert trained.encodings[0].word_ids == served.encodings[0].word_ids
    text = "  ".join(words)  # entity spans come from these offsets: each word's tokens must cover it exactly
    enc = ner.encode_texts(tok, [text]).encodings[0]
    spans = ner.absolute_offsets(text, enc.word_ids, enc.offsets)
    starts = ner.split_words(text)[1]
    for w, word in enumerate(words):
        mine = [spans[t] for t, x in enumerate(enc.word_ids) if x == w]
        assert (min(a for a, _ in mine), max(b for _, b in mine)) == (starts[w], starts[w] + len(word)), word


@pytest.mark.parametrize(("arch", "feeds"), [("bert", True), ("electra", True), ("xlm-roberta", False),
                                             ("roberta", False), ("deberta-v2", False), ("mpnet", False)])
def test_training_feeds_token_types_only_where_the_graph_takes_them(arch: str, feeds: bool, tmp_path: Path) -> None:
    """XLM-R QA windows past the first carry type id 1 (tokenizers), which its one-row table cannot index."""
    from transformers import AutoModelForQuestionAnswering

    from bertedge.runtime.tasks import QA
    from bertedge.toolchain.finetune import _Trainer

    model = AutoModelForQuestionAnswering.from_pretrained(make_family_model(tmp_path, arch, task="qa"))
    assert _Trainer(QA, model, torch.device("cpu"), 0, []).uses_type_ids is feeds


def test_modernbert_layers_get_layerwise_lr_depth() -> None:
    assert _layer_depth("model.layers.1.attn.Wqkv.weight", 2) == 2
    assert _layer_depth("model.embeddings.tok_embeddings.weight", 2) == 0


def test_finetune_refuses_unsupported_family_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_family_model(tmp_path / "base", "mpnet")
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8))

    def no_training(*a: Any, **k: Any) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr("bertedge.toolchain.finetune._Trainer.fit", no_training)
    blocked = tuple(dataclasses.replace(f, exportable=False, blocker="the tracer cannot follow its attention")
                    if f.model_type == "mpnet" else f for f in fam.FAMILIES)
    monkeypatch.setattr(fam, "FAMILIES", blocked)
    with pytest.raises(BertedgeError, match="MPNet .* cannot be exported to ONNX: the tracer cannot follow"):
        finetune(FinetuneArgs(model=str(base), train=train, out=tmp_path / "out", progress=False))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(BertedgeError, match="model_type 'gpt2' .* not supported"):
        finetune(FinetuneArgs(model=str(base), train=train, out=tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the matrix


def _data(task: str, folder: Path) -> tuple[Path, Path]:
    """(train, eval) files: learnable sentiment CSV, CoNLL sentences, or SQuAD-style JSONL."""
    if task == "classification":
        return (write_csv(folder / "train.csv", sentiment_rows(200, seed=1)),
                write_csv(folder / "eval.csv", sentiment_rows(24, seed=2)))
    if task == "ner":
        path = folder / "ner.txt"
        path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in s) + "\n" for s in NER_SENTENCES * 6))
        return path, path
    rows = [{"question": q, "context": QA_CONTEXT,
             "answers": {"text": [a], "answer_start": [QA_CONTEXT.index(a)]}} for q, a in QA_ROWS] * 6
    path = write_jsonl(folder / "qa.jsonl", rows)  # type: ignore[arg-type]
    return path, path


def _fused_ops(notes: str) -> set[str]:
    return set(re.findall(r"(\w+) x\d+", notes))


def _torch_run(model_dir: Path, input_names: list[str], enc: Any) -> Any:
    """PyTorch's outputs for one tokenizers Encoding, fed the graph's inputs."""
    import transformers

    auto = getattr(transformers, read_model_meta(model_dir).task.hf_auto_class)
    model = auto.from_pretrained(model_dir).eval()
    arrays = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
    with torch.no_grad():
        return model(**{n: torch.tensor([arrays[n]]) for n in input_names})


def _check_predictions(task: str, bundle: Path, model_dir: Path, report: ExportReport) -> None:
    """The bundle's answers equal PyTorch's on the runtime's own tokenization."""
    p = Predictor(bundle, threads=1)
    assert list(p.feeds) == report.input_names
    if task == "classification":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        for text, result in zip(TEXTS, p.predict(TEXTS), strict=True):
            enc = hf_tok(text, return_tensors="pt")  # transformers' own tokenization of tokenizer.json
            with torch.no_grad():
                probs = torch.softmax(model(**{n: enc[n] for n in report.input_names}).logits, -1)[0].numpy()
            assert result["label"] == report.labels[int(probs.argmax())]
            np.testing.assert_allclose([result["probabilities"][lab] for lab in report.labels], probs, atol=2e-2)
        return
    if task == "ner":
        text = "John Smith lives in Paris ."
        enc = ner.encode_texts(p.tokenizer, [text]).encodings[0]  # whitespace words, as training sees them
        logits = _torch_run(model_dir, report.input_names, enc).logits[0].numpy()
        spans = ner.absolute_offsets(text, enc.word_ids, enc.offsets)
        want = [ner.trim_entity(text, e) for e in ner.group_entities(text, logits, enc.word_ids, spans,
                                                                      list(report.labels))]
        entities = p.predict([text])[0]["entities"]
        assert [(e["type"], e["start"], e["end"]) for e in entities] == [(e["type"], e["start"], e["end"]) for e in want]
        assert all(text[e["start"]:e["end"]] == e["text"] and e["text"] == e["text"].strip() for e in entities)
        return
    question, context = QA_ROWS[0][0], "the film was good . " * 3 + QA_CONTEXT
    answer = p.predict([{"question": question, "context": context}])[0]
    features = qa.encode_qa(p.tokenizer, [question], [context])
    windows = []
    for enc in features.encodings:
        out = _torch_run(model_dir, report.input_names, enc)
        windows.append((enc, out.start_logits[0].numpy(), out.end_logits[0].numpy()))
    best = qa.best_spans(windows, context)[0]
    assert (answer["start"], answer["end"], answer["answer"]) == (best["start"], best["end"], best["text"])


MATRIX = [pytest.param(arch, task, id=f"{arch}-{task}",
                       marks=() if task == "classification" or arch in DEFAULT_SEQUENCE_TASK_FAMILIES
                       else pytest.mark.slow)
          for arch in FAMILIES for task in fam.ALL_TASKS]


@pytest.mark.parametrize(("arch", "task"), MATRIX)
def test_family_end_to_end(arch: str, task: str, tmp_path: Path) -> None:
    """finetune -> export (fp32 parity, fusion as recorded, INT8 agreement) -> package -> predict."""
    f = fam.family(arch)
    labels = NER_LABELS if task == "ner" else ("negative", "positive")
    base = make_family_model(tmp_path / "base", arch, task=task, labels=labels)
    train, dev = _data(task, tmp_path)
    result = finetune(FinetuneArgs(model=str(base), train=train, eval=dev, task=task, out=tmp_path / "model",
                                   epochs=6, batch_size=16, lr=1e-2, layer_lr_decay=1.0, patience=0, max_length=48,
                                   stride=16, progress=False, seed=0, threads=1))
    if task == "classification":  # the cue words make this easy; a constant model would hide INT8 flips
        assert result.metrics["eval"]["accuracy"] >= 0.75, result.metrics["history"]
    report = export(ExportArgs(tmp_path / "model", tmp_path / "export", eval_file=dev))
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert report.input_names == f.input_names(int(config.get("type_vocab_size") or 0))

    fp32, fused, int8 = (report.artifact(n) for n in ("fp32", "fused", "int8"))
    assert fp32 is not None and fused is not None and int8 is not None
    for a in (fp32, fused):
        assert a.passed and a.max_abs_diff_real is not None and a.max_abs_diff_random is not None
        assert max(a.max_abs_diff_real, a.max_abs_diff_random) < 1e-4, a.name
    ops = _fused_ops(fused.notes)
    assert ("Attention" in ops) == f.attention_fused, fused.notes
    assert set(f.fused) - {"Gelu"} <= ops, fused.notes  # Gelu: only where a head has its own
    assert int8.validated and int8.label_agreement >= (0.9 if f.int8_dynamic else 0.0), int8.notes
    print(f"{arch} {task}: {result.metrics['task']} eval {result.metrics['eval'][TASK_METRIC[task]]:.3f}; fp32 max|diff| {max(fp32.max_abs_diff_real or 0, fp32.max_abs_diff_random or 0):.1e}, "
          f"{fused.notes}; int8 agreement {int8.label_agreement:.4f} passed={int8.passed}")

    artifact = "fused" if task != "classification" else None  # per-token answers: compare exactly
    bundle = package(PackageArgs(tmp_path / "export", tmp_path / "bundle", artifact=artifact)).root
    _check_predictions(task, bundle, tmp_path / "model", report)
