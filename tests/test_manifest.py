"""The manifest as one checked record, and the issue-24 defects around it, grouped by cause.

Each group is a shared cause: a manifest fact the graph or tokenizer contradicts, a field out
of range, an export folder package trusted, a bundle write that was not atomic, an archive
member nobody listed, an error message nobody capped, a label name used twice, and finetune
data or weights it did not check.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from tiny import make_tiny_model, sentiment_rows, write_csv

from bertedge.errors import BertedgeError
from bertedge.runtime import Predictor
from bertedge.runtime.bundle import PackageArgs, open_bundle, package

OUTPUTS = {"classification": ["logits"], "ner": ["logits"], "qa": ["start_logits", "end_logits"]}
LABELS = {"classification": ("negative", "positive"), "ner": ("O", "B-PER", "I-PER"), "qa": ("start", "end")}
AUTO = {"classification": "AutoModelForSequenceClassification", "ner": "AutoModelForTokenClassification",
        "qa": "AutoModelForQuestionAnswering"}


def tiny_export(base: Path, task: str) -> Path:
    """An export folder as `bertedge export` writes it (fp32 only, checksums recorded), by hand."""
    import torch
    import transformers

    model_dir = make_tiny_model(base / "model", task=task, labels=LABELS[task])
    out = base / "export"
    out.mkdir(parents=True)
    model = getattr(transformers, AUTO[task]).from_pretrained(model_dir).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dummy = tuple(torch.ones(2, 8, dtype=torch.long) for _ in names)
    per_token = task != "classification"
    axes = {n: {0: "batch", 1: "sequence"} for n in names + (OUTPUTS[task] if per_token else [])}
    axes |= {} if per_token else {"logits": {0: "batch"}}
    torch.onnx.export(model, dummy, str(out / "model.onnx"), input_names=names, output_names=OUTPUTS[task],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(model_dir / name, out / name)
    meta = {"task": task, "labels": list(LABELS[task]), "max_length": 32, "model_type": "bert", "stride": 8}
    (out / "bertedge.json").write_text(json.dumps(meta))
    digest = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    copied = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("tokenizer.json", "bertedge.json")}
    report = {"opset": 17, "recommended": "fp32", "metadata_sha256": copied, "artifacts": [
        {"name": "fp32", "file": "model.onnx", "precision": "fp32", "quantization": None, "validated": True,
         "passed": True, "label_agreement": 1.0, "sha256": {"model.onnx": digest}}]}
    (out / "export-report.json").write_text(json.dumps(report))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One read-only export folder per task (copy before damaging)."""
    base = tmp_path_factory.mktemp("manifest-exports")
    return {task: tiny_export(base / task, task) for task in OUTPUTS}


@pytest.fixture(scope="module")
def bundles(exports: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One read-only bundle folder per task."""
    base = tmp_path_factory.mktemp("manifest-bundles")
    return {task: package(PackageArgs(export, base / task)).root for task, export in exports.items()}


def rebundle(bundle: Path, dest: Path, change: dict[str, Any] | None = None, model: Path | None = None,
             tokenizer: bytes | None = None) -> Path:
    """A copy of a bundle with another model or tokenizer and manifest changes, checksums renewed
    (so only the manifest-vs-graph checks can catch the mismatch)."""
    shutil.copytree(bundle, dest)
    if model is not None:
        shutil.copy(model, dest / "model.onnx")
    if tokenizer is not None:
        (dest / "tokenizer.json").write_bytes(tokenizer)
    manifest = json.loads((dest / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (dest / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest.update(change or {})
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def refused(path: Path, match: str) -> str:
    """Loading `path` fails with one BertedgeError line matching `match`; its text."""
    with pytest.raises(BertedgeError, match=match) as e:
        Predictor(path, threads=1)
    text = str(e.value)
    assert "\n" not in text and len(text) < 2000, text
    return text


# ----------------------------------------------------------------------------- the record


def test_the_manifest_is_a_typed_record_and_keeps_its_digest(bundles: dict[str, Path]) -> None:
    from bertedge.runtime.manifest import Manifest

    raw = json.loads((bundles["qa"] / "manifest.json").read_text())
    with open_bundle(bundles["qa"]) as b:
        m = b.manifest
        assert isinstance(m, Manifest) and b.tokenizer is not None  # loaded once, at verification
    assert (m.task, m.labels, m.max_length, m.stride, m.max_positions) == ("qa", ("start", "end"), 32, 8, 128)
    assert (m.engine, m.precision, m.artifact, m.model_files) == ("onnxruntime", "fp32", "fp32", ("model.onnx",))
    assert m.files["model.onnx"].sha256 == raw["files"]["model.onnx"]["sha256"]
    assert m.meta().task.name == "qa" and m.window_stride == 8 and m.to_dict() == raw
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    assert m.digest == b.digest == hashlib.sha256(canonical).hexdigest()  # unchanged for old bundles


# ----------------------------------------------------------------------------- facts the graph contradicts
# defects 2 (positions, vocabulary), 4 (task switched), 16 (labels carried in the model file)


@pytest.mark.parametrize("change", [{"max_positions": 256, "max_length": 200}, {"max_positions": 512}])
def test_lengths_past_the_graphs_position_table_are_refused_at_load(bundles: dict[str, Path], tmp_path: Path,
                                                                     change: dict[str, Any]) -> None:
    copy = rebundle(bundles["classification"], tmp_path / "b", change)
    refused(copy, r"max_positions \d+ exceeds the graph's position table \(128 tokens\)")


def test_a_tokenizer_with_ids_past_the_vocabulary_is_refused_at_load(bundles: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundles["classification"] / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(300)])  # ids 142..441: the graph has 142 rows
    copy = rebundle(bundles["classification"], tmp_path / "b", tokenizer=tok.to_str().encode())
    refused(copy, r"the tokenizer's ids go up to 44\d but the graph's vocabulary has 142 rows")


@pytest.mark.parametrize("manifest_task, graph_task, rank", [("classification", "ner", 3),
                                                             ("ner", "classification", 2)])
def test_a_task_switched_between_classification_and_ner_is_refused(bundles: dict[str, Path], tmp_path: Path,
                                                                    manifest_task: str, graph_task: str,
                                                                    rank: int) -> None:
    labels = list(LABELS[graph_task])  # the label count fits: only the logits' rank tells
    copy = rebundle(bundles[graph_task], tmp_path / "b", {"task": manifest_task, "labels": labels})
    refused(copy, rf"task '{manifest_task}' needs a rank-\d logits output, but the graph's has rank {rank} "
                  rf"\(the graph fits task '{graph_task}'\)")


def test_the_model_file_carries_its_labels(bundles: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    props = {p.key: p.value for p in onnx.load(bundles["ner"] / "model.onnx").metadata_props}
    assert json.loads(props["bertedge.labels"]) == list(LABELS["ner"])
    copy = rebundle(bundles["ner"], tmp_path / "b", {"labels": ["O", "B-LOC", "I-LOC"]})  # renamed
    refused(copy, "the model file carries the labels")


# ----------------------------------------------------------------------------- fields out of range
# defects 10 (QA stride), 21 (precision), and the rest of the schema


@pytest.mark.parametrize("task, change, match", [
    ("qa", {"stride": 10**30}, r"stride must be a positive integer.*got 1000000000000"),
    ("qa", {"stride": 32}, "stride 32 must be less than max_length 32"),
    ("qa", {"stride": 0}, "stride must be a positive integer"),
    ("classification", {"stride": 10**30}, "stride must be a positive integer"),
    ("classification", {"precision": "int3"}, "precision 'int3' is not one of fp32, int8, bf16, fp16"),
    ("classification", {"artifact": "int9"}, "artifact 'int9' is not a kind this bertedge knows"),
    ("classification", {"max_length": 10**30}, r"max_length 1000000000000.* is outside 8\.\.128"),
    ("classification", {"max_positions": 10**30}, r"max_positions must be an integer in 8\.\.1048576"),
    ("classification", {"labels": ["positive"]}, "task 'classification' needs at least 2 labels"),
    ("classification", {"labels": ["a", ""]}, "labels must all be non-empty strings"),
    ("classification", {"inputs": []}, "inputs must be a non-empty list"),
    ("classification", {"engine": "tensorrt"}, "engine 'tensorrt' is not one this bertedge runs"),
    ("classification", {"artifact": [], "engine": {}}, r"engine \{\} .*artifact \[\] is not a kind"),  # fuzz
])
def test_every_field_is_range_checked(bundles: dict[str, Path], tmp_path: Path, task: str,
                                      change: dict[str, Any], match: str) -> None:
    refused(rebundle(bundles[task], tmp_path / "b", change), match)


def test_a_stride_past_the_window_from_an_old_classification_bundle_still_loads(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    copy = rebundle(bundles["classification"], tmp_path / "b", {"stride": 128})  # finetune wrote 128 for all
    assert Predictor(copy, threads=1).predict(["a good film"])[0]["label"] in LABELS["classification"]


# ----------------------------------------------------------------------------- what package trusts
# defect 5 (artifact checksums, the tokenizer loaded once), 23 (the fix names `bertedge export`)


def copied_export(exports: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(exports["classification"], tmp_path / "export"))


def test_package_refuses_an_artifact_changed_since_export(exports: dict[str, Path], tmp_path: Path) -> None:
    export = copied_export(exports, tmp_path)
    data = bytearray((export / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (export / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BertedgeError, match=r"model.onnx changed since export.*run `bertedge export"):
        package(PackageArgs(export, tmp_path / "b"))
    shutil.copy(exports["classification"] / "model.onnx", export / "model.onnx")
    shutil.copy(exports["qa"] / "tokenizer.json", export / "tokenizer.json")  # swapped beside it
    (export / "tokenizer.json").write_text((export / "tokenizer.json").read_text() + " ")
    with pytest.raises(BertedgeError, match=r"tokenizer.json changed since export"):
        package(PackageArgs(export, tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_package_warns_when_an_old_report_has_no_checksums(exports: dict[str, Path], tmp_path: Path) -> None:
    export = copied_export(exports, tmp_path)
    report = json.loads((export / "export-report.json").read_text())
    del report["artifacts"][0]["sha256"]
    (export / "export-report.json").write_text(json.dumps(report))
    with pytest.warns(RuntimeWarning, match="records no SHA-256 for artifact 'fp32'"):
        assert package(PackageArgs(export, tmp_path / "b")).root.is_dir()


def test_package_loads_the_tokenizer_and_names_export_as_the_fix(exports: dict[str, Path], tmp_path: Path) -> None:
    export = copied_export(exports, tmp_path)
    report = json.loads((export / "export-report.json").read_text())
    del report["metadata_sha256"]  # a report from before export recorded them
    (export / "export-report.json").write_text(json.dumps(report))
    (export / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(BertedgeError, match=r"is not a valid tokenizer.json .*run `bertedge export"):
        package(PackageArgs(export, tmp_path / "b"))
    (export / "export-report.json").write_text("{broken")
    with pytest.raises(BertedgeError, match=r"export-report.json' is not valid JSON.*run `bertedge export") as e:
        package(PackageArgs(export, tmp_path / "b"))
    assert "bertedge package" not in str(e.value)


# ----------------------------------------------------------------------------- writing the bundle
# defects 8 / 9 / 18: staged, locked, stale partials removed, a non-bundle file never replaced


def test_overwrite_never_replaces_a_file_that_is_not_a_bundle_archive(exports: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    precious = tmp_path / "notes.zip"
    precious.write_text("my notes, not a bundle")
    with pytest.raises(BertedgeError, match="is not a bundle archive; refusing to overwrite it"):
        package(PackageArgs(exports["classification"], precious, overwrite=True))
    assert precious.read_text() == "my notes, not a bundle"


def test_a_concurrent_package_into_the_same_out_fails_and_stale_partials_go(exports: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    from bertedge.runtime.outputs import lock

    dest = tmp_path / "b"
    with lock(dest, "the bundle"), pytest.raises(BertedgeError, match="another bertedge process is writing"):
        package(PackageArgs(exports["classification"], dest))
    assert not dest.exists()
    stale = tmp_path / ".b.partial-99999-x"  # left by a SIGKILLed run
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    package(PackageArgs(exports["classification"], dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ----------------------------------------------------------------------------- archives and messages
# defects 19 (unlisted members), 20 (capped messages), 23 (archive named, "edited" not "truncated")


def test_a_zip_bundles_unlisted_members_are_not_extracted(bundles: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in bundles["classification"].iterdir():
            zf.write(p, arcname=p.name)
        zf.writestr("run-me.sh", "rm -rf ~")
    with open_bundle(archive) as b:
        assert sorted(p.name for p in b.root.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]


def test_errors_about_an_archive_name_the_archive(bundles: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for p in bundles["classification"].iterdir():
            data = p.read_bytes()
            if p.name == "model.onnx":
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            info = tarfile.TarInfo(p.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    text = refused(archive, r"file 'model.onnx' is corrupt")
    assert text.startswith(f"bundle archive '{archive}'") and "bertedge-bundle-" not in text


def test_an_edited_tokenizer_is_not_called_truncated(bundles: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundles["classification"], tmp_path / "b"))
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"].pop("good")  # valid JSON, fewer bytes
    (copy / "tokenizer.json").write_text(json.dumps(tok, indent=None))
    text = refused(copy, "file 'tokenizer.json' was edited")
    assert "truncated" not in text


@pytest.mark.parametrize("change", [
    {"files": {f"../f{i}": {} for i in range(12)} | {"model.onnx": {}, "tokenizer.json": {}}},
    {"labels": list(range(100_000))},
    {"task": "x" * 1_000_000, "labels": ["y" * 1_000_000] * 3},
])
def test_error_messages_are_capped(bundles: dict[str, Path], tmp_path: Path, change: dict[str, Any]) -> None:
    copy = Path(shutil.copytree(bundles["classification"], tmp_path / "b"))
    manifest = json.loads((copy / "manifest.json").read_text()) | change
    (copy / "manifest.json").write_text(json.dumps(manifest))
    refused(copy, "not a valid bertedge manifest")  # one line, under 2000 characters


def test_many_problems_end_in_and_n_more(bundles: dict[str, Path]) -> None:
    from bertedge.runtime.manifest import parse_manifest

    raw = json.loads((bundles["classification"] / "manifest.json").read_text())
    raw["files"] = {f"../f{i}": {} for i in range(14)}
    with pytest.raises(BertedgeError, match=r"; and \d+ more"):
        parse_manifest(raw)


# ----------------------------------------------------------------------------- label names
# defect 14: refused where they are first given, with the fix for that verb


def test_duplicate_label_names_are_refused_by_finetune_args(tmp_path: Path) -> None:
    from bertedge.toolchain.finetune import FinetuneArgs

    with pytest.raises(BertedgeError, match=r"--label-names repeat 'pos'.*one name in --label-names"):
        FinetuneArgs(model="minilm", train=tmp_path / "t.csv", out=tmp_path / "m", label_names=("pos", "pos"))


def test_duplicate_labels_in_an_export_are_refused_by_package(exports: dict[str, Path], tmp_path: Path) -> None:
    export = copied_export(exports, tmp_path)
    meta = json.loads((export / "bertedge.json").read_text()) | {"labels": ["pos", "pos"]}
    (export / "bertedge.json").write_text(json.dumps(meta))
    with pytest.raises(BertedgeError, match=r"repeat 'pos'.*re-run `bertedge finetune` with unique --label-names"):
        package(PackageArgs(export, tmp_path / "b"))


# ----------------------------------------------------------------------------- finetune: weights and windows
# defect 15


def test_finetune_on_truncated_weights_is_one_clean_line(tiny_bert: Path, tmp_path: Path) -> None:
    from bertedge.toolchain.finetune import FinetuneArgs, finetune

    model = Path(shutil.copytree(tiny_bert, tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    train = write_csv(tmp_path / "train.csv", sentiment_rows(20))
    with pytest.raises(BertedgeError, match=r"cannot load the weights in .*restore model.safetensors") as e:
        finetune(FinetuneArgs(model=str(model), train=train, out=tmp_path / "m", epochs=1, progress=False))
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()


def test_the_default_qa_stride_follows_the_max_length() -> None:
    from bertedge.runtime.meta import resolve_stride
    from bertedge.runtime.tasks import CLASSIFICATION, QA
    from bertedge.toolchain.finetune import FinetuneArgs

    assert FinetuneArgs.__dataclass_fields__["stride"].default == 0  # 0: derived, not a fixed 128
    assert resolve_stride(0, QA, 64) == 32 and resolve_stride(0, QA, 384) == 128
    assert resolve_stride(128, CLASSIFICATION, 32) == 16  # unused outside QA: always valid
    with pytest.raises(BertedgeError, match=r"--stride 64 must be in 1\.\.63"):
        resolve_stride(64, QA, 64)


# ----------------------------------------------------------------------------- finetune data


@pytest.mark.parametrize("text", ["\x00\x00", "\u200b\ufeff", " \x01 "])
def test_control_and_zero_width_rows_count_as_blank(tmp_path: Path, text: str) -> None:
    from bertedge.runtime.data import BadRows, Columns, load_text_classification

    path = tmp_path / "t.jsonl"
    rows = [{"text": "a good film", "label": "pos"}, {"text": text, "label": "neg"}, {"text": "bad", "label": "neg"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(BertedgeError, match="line 2: empty text in column 'text'"):
        load_text_classification(path, Columns())
    kept = load_text_classification(path, Columns(), bad_rows=BadRows.SKIP)
    assert kept.texts == ["a good film", "bad"] and kept.skipped[0].line == 2


@pytest.mark.parametrize("label", [["pos"], {"name": "pos"}])
def test_jsonl_labels_that_are_lists_or_objects_are_refused(tmp_path: Path, label: object) -> None:
    from bertedge.runtime.data import Columns, load_text_classification

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "a good film", "label": label}) + "\n", encoding="utf-8")
    with pytest.raises(BertedgeError, match="line 1: the label in column 'label' is a JSON list or object") as e:
        load_text_classification(path, Columns())
    assert "\n" not in str(e.value)


def test_one_row_of_training_data_says_what_is_wrong(tmp_path: Path) -> None:
    from bertedge.runtime.data import (
        Columns,
        check_trainable,
        load_text_classification,
        seeded_split,
    )

    path = write_csv(tmp_path / "t.csv", [("a good film", 1)])
    train, _ = seeded_split(load_text_classification(path, Columns()), 0.1, 42)
    with pytest.raises(BertedgeError, match="no training rows are left") as e:
        check_trainable(train)
    assert "'?'" not in str(e.value)


def test_a_qa_export_without_labels_packages_and_predicts(exports: dict[str, Path], tmp_path: Path) -> None:
    """`finetune --task qa` writes no labels (bertedge.json `labels: []`, no id2label): the manifest
    allows none for QA (it refused every real QA model's bundle), and still one for NER."""
    export = shutil.copytree(exports["qa"], tmp_path / "export")
    meta = json.loads((export / "bertedge.json").read_text())
    config = json.loads((export / "config.json").read_text())
    meta["labels"] = []
    for key in ("id2label", "label2id"):
        config.pop(key, None)
    (export / "bertedge.json").write_text(json.dumps(meta))
    (export / "config.json").write_text(json.dumps(config))
    report = json.loads((export / "export-report.json").read_text())
    for name in ("bertedge.json", "config.json"):  # as export would have recorded them
        report["metadata_sha256"][name] = hashlib.sha256((export / name).read_bytes()).hexdigest()
    (export / "export-report.json").write_text(json.dumps(report))
    bundle = package(PackageArgs(export, tmp_path / "b")).root
    assert json.loads((bundle / "manifest.json").read_text())["labels"] == []
    answers = Predictor(bundle).predict([("Where does John live?", "John lives in Paris .")])
    assert len(answers) == 1 and "answer" in answers[0]
