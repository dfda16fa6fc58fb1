"""The bundle format: package an export folder, archive it, verify it at load."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime import Predictor
from bertedge.runtime.bundle import ArchiveFormat, PackageArgs, open_bundle, package

LABELS = ["negative", "positive"]
TEXTS = ["a good film", "the plot was awful", ("what a story", "it was great")]


def hand_export(model_dir: Path, out: Path, arch: str, max_length: int = 32) -> Path:
    """An export folder as `bertedge export` writes it, built by hand so the test controls it:
    fp32 passed, a copy posing as INT8 that failed validation."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if (out / "export-report.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    dummy = tuple(torch.ones(2, 8, dtype=torch.long) for _ in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    torch.onnx.export(model, dummy, str(out / "model.onnx"), input_names=names, output_names=["logits"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    shutil.copy(out / "model.onnx", out / "model-int8.onnx")
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(model_dir / name, out / name)
    meta = {"task": "classification", "labels": LABELS, "max_length": max_length, "model_type": arch}
    (out / "bertedge.json").write_text(json.dumps(meta))
    quant = {"method": "dynamic", "per_channel": False}
    sums = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("model.onnx", "model-int8.onnx")}
    report = {"model_dir": str(model_dir), "opset": 17, "recommended": "fp32", "artifacts": [
        {"name": "fp32", "file": "model.onnx", "precision": "fp32", "quantization": None,
         "validated": True, "passed": True, "label_agreement": 1.0, "metric": {"accuracy": 0.9},
         "sha256": {"model.onnx": sums["model.onnx"]}},
        {"name": "int8", "file": "model-int8.onnx", "precision": "int8", "quantization": quant,
         "validated": True, "passed": False, "label_agreement": 0.7, "metric": {"accuracy": 0.6},
         "sha256": {"model-int8.onnx": sums["model-int8.onnx"]}},
    ]}
    (out / "export-report.json").write_text(json.dumps(report))
    return out


@pytest.fixture(scope="session")
def bert_export(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hand_export(tiny_bert, tmp_path_factory.getbasetemp() / "hand-export-bert", "bert")


@pytest.fixture(scope="session")
def bert_bundle(bert_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only bundle folder: copy it before damaging it."""
    return package(PackageArgs(bert_export, tmp_path_factory.mktemp("bundles") / "bundle")).root


def damaged(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


def test_manifest_lists_everything_predict_needs(bert_bundle: Path, bert_export: Path) -> None:
    m = json.loads((bert_bundle / "manifest.json").read_text())
    assert sorted(p.name for p in bert_bundle.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]
    assert (m["format"], m["format_version"], m["bertedge_version"]) == ("bertedge-bundle", 1, "0.1.0")
    assert (m["task"], m["labels"], m["max_length"], m["model_type"]) == ("classification", LABELS, 32, "bert")
    assert m["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert m["precision"] == "fp32" and m["quantization"] is None
    for name in ("model.onnx", "tokenizer.json"):
        data = (bert_bundle / name).read_bytes()
        assert m["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    prov = m["provenance"]
    assert prov["artifact"]["label_agreement"] == 1.0 and prov["artifact"]["metric"] == {"accuracy": 0.9}
    assert prov["recommended"] == "fp32" and prov["forced"] is False
    assert prov["export"]["opset"] == 17
    exported = (bert_export / "model.onnx").read_bytes()  # the graph as validated, labels appended
    assert (bert_bundle / "model.onnx").read_bytes().startswith(exported)
    import onnx

    shipped, original = onnx.load(bert_bundle / "model.onnx"), onnx.load(bert_export / "model.onnx")
    assert {p.key: p.value for p in shipped.metadata_props}["bertedge.labels"] == json.dumps(LABELS)
    assert shipped.graph == original.graph


def test_distilbert_bundle_has_no_token_type_ids(tiny_distilbert: Path, tmp_path: Path) -> None:
    export_dir = hand_export(tiny_distilbert, tmp_path / "export", "distilbert")
    bundle = package(PackageArgs(export_dir, tmp_path / "bundle")).root
    assert json.loads((bundle / "manifest.json").read_text())["inputs"] == ["input_ids", "attention_mask"]
    assert Predictor(bundle).predict(["a good film"])[0]["label"] in LABELS


@pytest.mark.parametrize("out_name, archive", [("b.tar.gz", None), ("b.zip", None), ("b", "zip"),
                                               ("b", "tar.gz")])
def test_archives_give_the_same_predictions(bert_export: Path, bert_bundle: Path, tmp_path: Path,
                                            out_name: str, archive: str | None) -> None:
    result = package(PackageArgs(bert_export, tmp_path / out_name, archive=archive))  # type: ignore[arg-type]
    assert result.root.is_file() and result.root.name.endswith((".tar.gz", ".zip"))
    assert Predictor(result.root).predict(TEXTS) == Predictor(bert_bundle).predict(TEXTS)


def test_archive_of_the_folder_itself_opens(bert_bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "hand.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bert_bundle, arcname="bundle")  # like `tar czf hand.tar.gz bundle/`
    with open_bundle(archive) as b:
        assert b.manifest.task == "classification"
        extracted = b.root
    assert not extracted.exists()  # the temporary extraction is cleaned up


def test_refuses_failed_artifact_unless_forced(bert_export: Path, tmp_path: Path) -> None:
    with pytest.raises(BertedgeError, match=r"'int8' failed validation.*--force"):
        package(PackageArgs(bert_export, tmp_path / "b", artifact="int8"))
    forced = package(PackageArgs(bert_export, tmp_path / "b", artifact="model-int8.onnx", force=True))
    m = forced.manifest
    assert m.precision == "int8" and m.quantization is not None and m.quantization["method"] == "dynamic"
    assert m.provenance["forced"] is True and m.provenance["artifact"]["passed"] is False


def test_unknown_artifact_lists_the_choices(bert_export: Path, tmp_path: Path) -> None:
    with pytest.raises(BertedgeError, match="no artifact named 'fp16'.*fp32, int8"):
        package(PackageArgs(bert_export, tmp_path / "b", artifact="fp16"))


def test_incomplete_export_folder_lists_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(BertedgeError, match="does not exist"):
        package(PackageArgs(tmp_path / "nope", tmp_path / "b"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "bertedge.json").write_text("{}")
    with pytest.raises(BertedgeError, match="missing export-report.json, config.json, tokenizer.json"):
        package(PackageArgs(tmp_path / "half", tmp_path / "b"))


def test_will_not_overwrite_a_folder_that_is_not_a_bundle(bert_export: Path, tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(BertedgeError, match="not a bundle; refusing"):
        package(PackageArgs(bert_export, tmp_path / "precious"))


@pytest.mark.parametrize("name", ["b", "b.tar.gz", "b.zip"])
def test_existing_bundle_is_replaced_only_with_overwrite(bert_export: Path, tmp_path: Path,
                                                         name: str) -> None:
    first = package(PackageArgs(bert_export, tmp_path / name)).root
    before = first.stat().st_mtime_ns
    with pytest.raises(BertedgeError, match="already exists.*--overwrite"):
        package(PackageArgs(bert_export, tmp_path / name))
    assert first.stat().st_mtime_ns == before  # untouched
    again = package(PackageArgs(bert_export, tmp_path / name, overwrite=True))
    assert again.root == first and Predictor(again.root).predict(TEXTS[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no partial or probe left


def test_unwritable_out_is_one_clean_error_before_writing(bert_export: Path, tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:  # root ignores permission bits: use a folder no one may create files in
        out = Path("/sys/bertedge-test-bundle")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "bundle"
    for dest in (out, out.with_name(out.name + ".tar.gz")):
        with pytest.raises(BertedgeError, match="cannot write the bundle") as e:
            package(PackageArgs(bert_export, dest))
        assert "\n" not in str(e.value) and not dest.exists()
    file_parent = tmp_path / "a-file"
    file_parent.write_text("x")
    with pytest.raises(BertedgeError, match="cannot write the bundle"):
        package(PackageArgs(bert_export, file_parent / "bundle"))


def test_corrupt_file_is_named(bert_bundle: Path, tmp_path: Path) -> None:
    bundle = damaged(bert_bundle, tmp_path)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BertedgeError, match=r"file 'model.onnx' is corrupt \(SHA-256") as e:
        Predictor(bundle)
    assert "tokenizer.json" not in str(e.value) and "bertedge package" in str(e.value)


def test_truncated_and_missing_files_are_named_together(bert_bundle: Path, tmp_path: Path) -> None:
    bundle = damaged(bert_bundle, tmp_path)
    with (bundle / "tokenizer.json").open("r+b") as f:
        f.truncate(100)
    (bundle / "model.onnx").unlink()
    with pytest.raises(BertedgeError) as e:
        Predictor(bundle)
    assert "file 'model.onnx' is missing" in str(e.value)
    assert "file 'tokenizer.json' is truncated (100 bytes" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage, message", [
    (lambda m: "{not json", "is not valid JSON"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "labels"}), "missing labels"),
    (lambda m: json.dumps({**m, "format_version": 99}), "newer than this bertedge"),
    (lambda m: json.dumps({**m, "files": {"model.onnx": m["files"]["model.onnx"]}}), "no checksum for tokenizer.json"),
    (lambda m: json.dumps({**m, "task": "poetry"}), "unknown task 'poetry'"),
])
def test_bad_manifest(bert_bundle: Path, tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    bundle = damaged(bert_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(damage(manifest))
    with pytest.raises(BertedgeError, match=message):
        Predictor(bundle)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BertedgeError, match="does not exist.*bertedge package"):
        Predictor(tmp_path / "nope")
    with pytest.raises(BertedgeError, match="not a bertedge bundle"):
        Predictor(tmp_path)
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(BertedgeError, match="neither a bundle folder nor"):
        Predictor(tmp_path / "x.onnx")


@pytest.mark.parametrize("fmt", list(ArchiveFormat))
def test_truncated_archive(bert_export: Path, tmp_path: Path, fmt: ArchiveFormat) -> None:
    archive = package(PackageArgs(bert_export, tmp_path / "b", archive=fmt)).root
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(BertedgeError, match="truncated or corrupt"):
        Predictor(archive)


def test_archive_member_cannot_escape(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(BertedgeError, match="unsafe path"):
        Predictor(archive)
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("/etc/evil")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(BertedgeError, match="unsafe path"):
        Predictor(archive)


def test_cli_package(bert_export: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["package", str(bert_export), "--out", str(tmp_path / "b.zip")])
    assert ok.exit_code == 0, ok.output
    assert "packaged artifact 'fp32'" in ok.output and (tmp_path / "b.zip").is_file()
    again = runner.invoke(cli, ["package", str(bert_export), "--out", str(tmp_path / "b.zip")])
    assert again.exit_code != 0 and "already exists" in again.output and again.output.count("\n") == 1
    again = runner.invoke(cli, ["package", str(bert_export), "--out", str(tmp_path / "b.zip"), "--overwrite"])
    assert again.exit_code == 0, again.output
    bad = runner.invoke(cli, ["package", str(bert_export), "--out", str(tmp_path / "c"), "--artifact", "int8"])
    assert bad.exit_code != 0
    assert bad.output.startswith("Error: artifact 'int8' failed validation") and bad.output.count("\n") == 1


# ----------------------------------------------------------------------------- trust


def write_manifest(bundle: Path, change: dict[str, object]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(change)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_digest_is_the_canonical_manifest_hash_and_pins_the_bundle(bert_bundle: Path, tmp_path: Path) -> None:
    manifest = json.loads((bert_bundle / "manifest.json").read_text())
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical).hexdigest()
    with open_bundle(bert_bundle, expect_digest=digest) as b:
        assert b.digest == digest
    assert Predictor(bert_bundle, expect_digest=f"sha256:{digest.upper()}").predict(TEXTS[:1])
    with pytest.raises(BertedgeError, match=f"has digest {digest}, not the expected {'0' * 64}"):
        Predictor(bert_bundle, expect_digest="0" * 64)
    with pytest.raises(BertedgeError, match="not a SHA-256 digest"):
        Predictor(bert_bundle, expect_digest="abc")


def test_tampered_manifest_is_refused_when_pinned(bert_bundle: Path, tmp_path: Path) -> None:
    with open_bundle(bert_bundle) as b:
        digest = b.digest
    bundle = damaged(bert_bundle, tmp_path)
    write_manifest(bundle, {"created": "1999-01-01T00:00:00+00:00"})  # schema-valid, fits the graph
    assert Predictor(bundle).labels == ("negative", "positive")  # unpinned, nothing can tell
    with pytest.raises(BertedgeError, match="another or a modified bundle"):
        Predictor(bundle, expect_digest=digest)
    write_manifest(bundle, {"labels": ["negative", "POSITIVE"]})  # a renamed label: the model file says
    with pytest.raises(BertedgeError, match="the model file carries the labels"):
        Predictor(bundle)
    archive = package(PackageArgs(Path(json.loads((bert_bundle / "manifest.json").read_text())
                                       ["provenance"]["export_dir"]), tmp_path / "b.zip"))
    with open_bundle(archive.root, expect_digest=archive.digest):  # archives are pinned the same way
        pass


def test_cli_prints_the_digest_and_predict_checks_it(bert_export: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["package", str(bert_export), "--out", str(tmp_path / "b")])
    assert out.exit_code == 0, out.output
    digest = next(line.split()[1] for line in out.output.splitlines() if line.startswith("digest: "))
    with open_bundle(tmp_path / "b") as b:
        assert b.digest == digest
    ok = runner.invoke(cli, ["predict", str(tmp_path / "b"), "a good film", "-q", "--expect-digest", digest])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["predict", str(tmp_path / "b"), "a good film", "--expect-digest", "f" * 64])
    assert bad.exit_code != 0 and "not the expected" in bad.output and bad.output.count("\n") == 1


@pytest.mark.parametrize("change, message", [
    ({"labels": ["a", "b", "c"]}, "3 labels but the model outputs 2 logits"),
    ({"labels": None}, "labels must be a non-empty list"),
    ({"labels": []}, "labels must be a non-empty list"),
    ({"labels": ["a", "a"]}, "labels repeat 'a'"),
    ({"labels": ["a", 1]}, "labels must all be non-empty strings"),
    ({"max_length": 0}, r"max_length 0 is outside 8\.\.128"),
    ({"max_length": 129}, r"max_length 129 is outside 8\.\.128 \(the model has 128 positions\)"),
    ({"max_length": "32"}, "max_length must be an integer"),
    ({"max_positions": 0}, r"max_positions must be an integer in 8\.\.1048576 \(got 0\)"),
    ({"stride": "x"}, "stride must be a positive integer up to 1048576 or absent"),
    ({"files": ["model.onnx", "tokenizer.json"]}, "files must be an object"),
    ({"task": "qa"}, "task 'qa' needs graph output"),
    ({"task": None}, "unknown task None"),
    ({"format_version": "1"}, r"format_version must be an integer in 1\.\.1"),
    ({"provenance": 1}, "provenance must be an object or null"),  # found by test_fuzz_bundle
    ({"quantization": "int8"}, "quantization must be an object or null"),
])
def test_manifest_schema_is_checked_without_pinning(bert_bundle: Path, tmp_path: Path,
                                                   change: dict[str, object], message: str) -> None:
    bundle = damaged(bert_bundle, tmp_path)
    write_manifest(bundle, change)
    with pytest.raises(BertedgeError, match=message) as e:
        Predictor(bundle)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx", "..", ""])
def test_file_names_must_stay_inside_the_bundle(bert_bundle: Path, tmp_path: Path, name: str) -> None:
    bundle = damaged(bert_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    write_manifest(bundle, {"files": {**manifest["files"], name: manifest["files"]["model.onnx"]}})
    with pytest.raises(BertedgeError, match="is not a plain name inside the bundle"):
        Predictor(bundle)


def test_every_manifest_problem_in_one_error(bert_bundle: Path, tmp_path: Path) -> None:
    bundle = damaged(bert_bundle, tmp_path)
    write_manifest(bundle, {"labels": None, "max_length": 0, "files": {"../x": {}}})
    with pytest.raises(BertedgeError) as e:
        Predictor(bundle)
    text = str(e.value)
    assert all(m in text for m in ("labels must", "max_length 0", "'../x'", "no checksum for model.onnx"))


def test_archive_caps(bert_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bertedge.runtime import archive as archive_module

    archive = package(PackageArgs(bert_export, tmp_path / "b.tar.gz")).root
    size = sum(m.size for m in tarfile.open(archive).getmembers())
    monkeypatch.setattr(archive_module, "MAX_ARCHIVE_BYTES", size - 1)
    with pytest.raises(BertedgeError, match=f"at most 16 members and {size - 1} bytes"):
        Predictor(archive)
    monkeypatch.undo()
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(17):
            zf.writestr(f"f{i}.txt", "x")
    with pytest.raises(BertedgeError, match="holds 17 members"):
        Predictor(many)


def test_archive_that_lies_about_sizes_is_stopped_while_writing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from bertedge.runtime import archive as archive_module

    archive = tmp_path / "lies.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        listing = json.dumps({"files": {"model.onnx": {}}}).encode()
        head = tarfile.TarInfo("manifest.json")
        head.size = len(listing)
        tar.addfile(head, io.BytesIO(listing))
        info = tarfile.TarInfo("model.onnx")
        info.size = 4096
        tar.addfile(info, io.BytesIO(b"x" * 4096))
    monkeypatch.setattr(archive_module, "check_archive_index", lambda *a: None)  # as if the index lied
    monkeypatch.setattr(archive_module, "MAX_ARCHIVE_BYTES", 1000)
    with pytest.raises(BertedgeError, match="expands past 1000 bytes"):
        Predictor(archive)


def test_graph_outputs_read_without_a_session_match_onnxruntime(bert_bundle: Path, tmp_path: Path) -> None:
    from bertedge.runtime.graphinfo import graph_output_shapes
    from bertedge.runtime.sessions import make_session

    session = make_session(bert_bundle / "model.onnx", optimize=False)
    want = {o.name: list(o.shape) for o in session.get_outputs()}
    assert graph_output_shapes(bert_bundle / "model.onnx") == want and want["logits"][-1] == 2
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)  # not protobuf: onnxruntime gets the last word, as a clean error
    with pytest.raises(BertedgeError, match="onnxruntime cannot load"):
        graph_output_shapes(junk)
