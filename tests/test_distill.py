"""Distillation on tiny models: student construction, the loss, all three tasks, budget, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_tasks import NER_SENTENCES, conll, squad_doc
from tiny import make_tiny_model, sentiment_rows, write_csv

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime.tasks import CLASSIFICATION, NER
from bertedge.toolchain.distill import DistillArgs, Distiller, distill, layer_map, make_student
from bertedge.toolchain.finetune import FinetuneArgs, finetune

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """The tests train with one torch thread (tiny ops on a shared 2-core machine thrash with two);
    put the process-wide setting back for the tests that follow."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_cli(*argv: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(argv))
    crash = "" if result.exception is None or isinstance(result.exception, SystemExit) else repr(result.exception)
    return result.exit_code, result.output + crash


@pytest.fixture(scope="module")
def teacher(tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer sentiment classifier fine-tuned on the synthetic data (accuracy >= 0.85)."""
    out = tmp_path_factory.mktemp("teacher") / "m"
    r = finetune(FinetuneArgs(model=str(tiny_bert), train=sentiment_csv[0], eval=sentiment_csv[1], out=out,
                              epochs=6.0, batch_size=16, lr=1e-2, layer_lr_decay=1.0, progress=False,
                              max_length=32, patience=0, label_names=("negative", "positive"), threads=1))
    assert r.metrics["eval"]["accuracy"] >= 0.85
    return out


def torch_labels(model_dir: Path, texts: list[str]) -> list[str]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**AutoTokenizer.from_pretrained(model_dir)(texts, return_tensors="pt", padding=True)).logits
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)]


def quick(teacher: Path, train: Path, out: Path, **kw: object) -> DistillArgs:
    base = dict(teacher=teacher, train=train, out=out, layers="1", epochs=4.0, batch_size=16, lr=1e-2,
                progress=False, patience=0, max_accuracy_drop=10.0, threads=1)
    base.update(kw)
    return DistillArgs(**base)  # type: ignore[arg-type]


def test_layer_map_and_student_weights(teacher: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    assert layer_map(6, 3) == [1, 3, 5] and layer_map(12, 4) == [2, 5, 8, 11]
    t = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    s: Any = make_student(t, [1]).eval()
    assert s.config.num_hidden_layers == 1 and len(s.bert.encoder.layer) == 1
    assert torch.equal(s.bert.encoder.layer[0].output.dense.weight, t.bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(s.bert.embeddings.word_embeddings.weight, t.bert.embeddings.word_embeddings.weight)
    assert torch.equal(s.classifier.weight, t.classifier.weight)
    full = make_student(t, [0, 1]).eval()  # every layer kept: the same function as the teacher
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, t(input_ids=ids).logits)


def test_distillation_loss_masks_and_vanishes_on_the_teacher(tmp_path: Path) -> None:
    """KL is 0 when student == teacher, and NER positions labelled -100 never count."""
    from transformers import AutoModelForTokenClassification

    t = AutoModelForTokenClassification.from_pretrained(make_tiny_model(
        tmp_path / "t", task="ner", labels=("O", "B-PER", "I-PER"))).eval()
    args = DistillArgs(teacher=tmp_path / "t", train=tmp_path / "t", out=tmp_path / "s", temperature=3.0)
    ids = torch.tensor([[2, 7, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        soft = [{"logits": t(input_ids=ids[:, :4]).logits[0].numpy()}]
    d = Distiller(make_student(t, [0, 1]), t, NER, args, soft, [0, 1]).eval()
    labels = torch.tensor([[-100, 1, -100, -100, -100]])
    with torch.no_grad():
        same = d(ids, mask, window_index=torch.tensor([0]), labels=labels).loss
        gold = d.student(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert float(same) == pytest.approx(0.5 * float(gold), abs=1e-5)  # alpha 0.5: KL term is 0
        soft[0]["logits"][2:] += np.float32(5.0) * np.arange(3, dtype=np.float32)  # change ignored positions only
        assert float(d(ids, mask, window_index=torch.tensor([0]), labels=labels).loss) == pytest.approx(float(same), abs=1e-5)
        soft[0]["logits"][1, 0] += 5.0  # a labelled position: the KL term appears
        assert float(d(ids, mask, window_index=torch.tensor([0]), labels=labels).loss) > float(same) + 1e-3


def test_cli_distill_export_package_predict(teacher: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    train, dev = sentiment_csv
    code, out = run_cli("distill", str(teacher), "--train", str(train), "--eval", str(dev), "--out",
                        str(tmp_path / "s"), "--layers", "1", "--epochs", "4", "--lr", "1e-2", "--batch-size", "16",
                        "--patience", "0", "--max-accuracy-drop", "10", "--no-progress", "--threads", "1")
    assert code == 0, out
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    d = m["distillation"]
    assert d["teacher"]["layers"] == 2 and d["student"]["layers"] == 1 and d["student"]["teacher_layers_copied"] == [1]
    assert d["student"]["parameters"] < d["teacher"]["parameters"] and 0 < d["student"]["size_mb"] < d["teacher"]["size_mb"]
    assert d["student"]["accuracy"] >= 0.85 and d["drop_points"] <= 10
    assert f"student 1 layers accuracy {d['student']['accuracy']:.4f}" in out
    meta = json.loads((tmp_path / "s" / "bertedge.json").read_text())
    assert meta["task"] == "classification" and meta["labels"] == ["negative", "positive"]
    assert meta["distilled_from"] == str(teacher) and meta["model_type"] == "bert"
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 1

    code, out = run_cli("export", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--eval", str(dev))
    assert code == 0, out
    code, out = run_cli("package", str(tmp_path / "x"), "--out", str(tmp_path / "b"))
    assert code == 0, out
    texts = ["the film was very good", "a plot was bad"]
    code, out = run_cli("predict", str(tmp_path / "b"), *texts, "-q")
    assert code == 0, out
    assert [json.loads(x)["label"] for x in out.splitlines()] == torch_labels(tmp_path / "s", texts)


def test_budget_refusal_writes_nothing(teacher: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """A student taught the opposite labels (gold only) misses the budget: one clear error, no folder."""
    flipped = write_csv(tmp_path / "flipped.csv", [(t, 1 - y) for t, y in sentiment_rows(200, seed=1)])
    with pytest.raises(BertedgeError, match=r"no student within the budget: 1 layers scored .* > --max-accuracy-drop 1"):
        distill(quick(teacher, flipped, tmp_path / "s", eval=sentiment_csv[1], alpha=0.0, max_accuracy_drop=1.0))
    assert not (tmp_path / "s").exists()


def test_same_seed_same_student(teacher: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    runs = [distill(quick(teacher, sentiment_csv[0], tmp_path / f"r{i}", epochs=0.5, seed=s, max_train_rows=120))
            for i, s in enumerate((5, 5, 6))]
    w = [load_file(str(r.out / "model.safetensors")) for r in runs]
    assert w[0].keys() == w[1].keys() and all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert runs[0].metrics["history"] == runs[1].metrics["history"]
    assert any(not torch.equal(w[0][k], w[2][k]) for k in w[0])  # the seed matters (shuffling, dropout)


def test_unlabelled_rows_already_in_train_are_dropped(teacher: Path, sentiment_csv: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """--unlabelled may name the very file --max-train-rows subsets: the other rows become teacher data."""
    train = sentiment_csv[0]
    rows = len(train.read_text().splitlines()) - 1
    texts = [line.rsplit(",", 1)[0] for line in train.read_text().splitlines()[1:]]
    distinct = len(set(texts))
    r = distill(quick(teacher, train, tmp_path / "s", epochs=0.25, max_train_rows=80, unlabelled=train))
    data = r.metrics["data"]
    assert data["unlabelled_windows"] == distinct - len(set(texts) & set(_subset_texts(train, 80)))
    assert data["unlabelled_repeats_dropped"] == rows - data["unlabelled_windows"]


def _subset_texts(path: Path, n: int) -> list[str]:
    from bertedge.runtime.data import Columns, load_text_classification, seeded_subset

    return seeded_subset(load_text_classification(path, Columns()), n, 42).texts


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"text,label\nnice,1\n,0\n", "line 3: empty text"),
     (b"words,label\nnice,1\nbad,0\n", "no text column"),
     (b"text,label\nnice,1\nbad,7\n", "label '7'")],
)
def test_bad_input_is_one_line(teacher: Path, tmp_path: Path, content: bytes, needle: str) -> None:
    f = tmp_path / "train.csv"
    f.write_bytes(content)
    code, out = run_cli("distill", str(teacher), "--train", str(f), "--out", str(tmp_path / "o"))
    assert code != 0 and needle in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "o").exists()


def test_bad_teacher_and_options(teacher: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    train = str(sentiment_csv[0])
    for argv, needle in (
        ([str(tmp_path / "nope"), "--train", train], "is not a model folder"),
        ([str(teacher), "--train", train, "--layers", "2"], "the teacher has 2 layers"),
        ([str(teacher), "--train", train, "--layers", "three"], "--layers must be a positive integer or 'auto'"),
        ([str(teacher), "--train", train, "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    ):
        code, out = run_cli("distill", *argv, "--out", str(tmp_path / "o"), "--no-progress")
        assert code != 0 and needle in out and len(out.strip().splitlines()) == 1, out


def test_ner_student_with_unlabelled_texts(tmp_path: Path) -> None:
    base = make_tiny_model(tmp_path / "base", arch="distilbert")
    train = conll(tmp_path / "train.txt", NER_SENTENCES * 15)
    dev = conll(tmp_path / "dev.txt", NER_SENTENCES)
    finetune(FinetuneArgs(model=str(base), train=train, eval=dev, out=tmp_path / "t", task="ner", epochs=8,
                          lr=5e-3, layer_lr_decay=1.0, batch_size=8, progress=False, patience=0, threads=1))
    new = [f"{name} smith lives in {town}" for name in ("mary", "paul", "anna") for town in ("paris", "rome")]
    seen = [" ".join(w for w, _ in s) for s in NER_SENTENCES]  # already in train and dev: dropped
    texts = write_csv(tmp_path / "u.csv", [(t, 0) for t in new * 2 + seen])
    r = distill(quick(tmp_path / "t", train, tmp_path / "s", eval=dev, unlabelled=texts, epochs=6.0, lr=5e-3,
                      batch_size=8, max_accuracy_drop=100.0))
    d = r.metrics["distillation"]
    assert r.metrics["task"] == "ner" and d["student"]["layers"] == 1 and d["metric"] == "f1"
    assert r.metrics["data"]["unlabelled_windows"] == len(new)  # repeats within the file dropped too
    assert r.metrics["data"]["unlabelled_repeats_dropped"] == len(new) + len(seen)
    assert r.metrics["data"]["train_windows"] == len(NER_SENTENCES) * 15 + len(new)
    assert d["teacher"]["f1"] >= 0.5 and d["student"]["f1"] >= 0.5
    assert json.loads((r.out / "bertedge.json").read_text())["task"] == "ner"


def test_qa_student_auto_layers_hidden_matching(tmp_path: Path) -> None:
    base = make_tiny_model(tmp_path / "base", arch="bert", task="qa")
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(squad_doc(5)), encoding="utf-8")
    finetune(FinetuneArgs(model=str(base), train=squad, out=tmp_path / "t", task="qa", epochs=1, max_length=32,
                          stride=8, progress=False, eval_fraction=0.2, threads=1))
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text("".join(json.dumps({"question": "where does john live ?", "answers": [],
                                              "context": "the film was good . john lives in paris ."}) + "\n"
                                  for _ in range(4)), encoding="utf-8")
    r = distill(quick(tmp_path / "t", squad, tmp_path / "s", layers="auto", epochs=1.0, hidden_weight=1.0,
                      unlabelled=unlabelled, eval_fraction=0.2, max_accuracy_drop=100.0))
    d = r.metrics["distillation"]
    assert d["metric"] == "f1" and [a["layers"] for a in d["search"]] == [1] and d["hidden_weight"] == 1.0
    assert r.metrics["data"]["unlabelled_windows"] >= 4 and 0.0 <= d["student"]["f1"] <= 1.0
    meta = json.loads((r.out / "bertedge.json").read_text())
    assert meta["task"] == "qa" and meta["max_length"] == 32 and meta["stride"] == 8


def test_classification_pseudo_labels_follow_the_teacher() -> None:
    from bertedge.runtime.features import Features
    from bertedge.toolchain.distill import pseudo_targets

    soft = [{"logits": np.array([0.1, 2.0])}, {"logits": np.array([3.0, -1.0])}]
    assert pseudo_targets(CLASSIFICATION, Features([], []), soft) == [1, 0]


def test_benchmark_script_help() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--max-train-rows" in proc.stdout and "--teacher" in proc.stdout
