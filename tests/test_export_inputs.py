"""Export's unlabelled inputs: --calibration and --agreement-data read in the task's own format
(CoNLL for NER, SQuAD for QA) or as text columns, and the agreement texts encoded as the runtime
encodes them (NER's word split, QA's windows over the whole context)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tasks import NER_SENTENCES, conll, squad_doc
from tiny import make_tiny_model

from bertedge.errors import BertedgeError
from bertedge.runtime.tasks import MARGIN_MASK
from bertedge.toolchain.export import (
    ExportArgs,
    load_agreement_texts,
    load_calibration,
    load_source,
)


def rows(batches: list[dict]) -> int:
    return sum(len(b["input_ids"]) for b in batches)


def test_ner_reads_a_conll_train_file_for_calibration_and_agreement(tmp_path: Path) -> None:
    """The CoNLL file that fine-tuned a NER model feeds its export (it used to be read as a CSV
    and fail on a quote); agreement rows leave the calibration draw out and carry NER's margin mask."""
    model = make_tiny_model(tmp_path / "m", task="ner", labels=("O", "B-PER", "I-PER", "B-LOC", "I-LOC",
                                                                 "B-ORG", "I-ORG"))
    train = conll(tmp_path / "train.txt", [[('"quoted', "O"), *s] for s in NER_SENTENCES * 10])
    args = ExportArgs(model, tmp_path / "out", calibration=train, calibration_rows=8, agreement_data=train,
                      agreement_rows=1000)
    source = load_source(model)
    assert rows(load_calibration(args, source)) == 8
    agreement = load_agreement_texts(args, source)
    assert rows(agreement) == 40 - 8
    assert all(MARGIN_MASK in b for b in agreement)
    first = agreement[0]  # margin tokens are words' pieces: not [CLS], [SEP] or padding
    assert (first[MARGIN_MASK] <= first["attention_mask"]).all() and (first[MARGIN_MASK][:, 0] == 0).all()


def test_qa_agreement_from_a_squad_file_is_windowed_like_the_runtime(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m", task="qa", max_length=32)
    doc = squad_doc(2)
    doc["data"][0]["paragraphs"][0]["context"] += " the film was good ." * 60  # past one window
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(doc), encoding="utf-8")
    args = ExportArgs(model, tmp_path / "out", agreement_data=squad)
    source = load_source(model)
    batches = load_agreement_texts(args, source)
    assert rows(batches) > 24  # 24 questions, the long context's two of them in several windows each
    assert max(b["input_ids"].shape[1] for b in batches) <= source.info.max_length


def test_a_file_in_neither_format_is_one_problem_naming_both(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m", task="ner", labels=("O", "B-PER", "I-PER"))
    bad = tmp_path / "bad.csv"
    bad.write_text("title,body\nx,y\n", encoding="utf-8")
    with pytest.raises(BertedgeError, match=r"bad.csv: not ner data \(.*\) nor text columns \(.*text"):
        load_agreement_texts(ExportArgs(model, tmp_path / "out", agreement_data=bad), load_source(model))
