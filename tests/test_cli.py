"""The whole pipeline through the command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bertedge.cli import cli


def invoke(*argv: str) -> str:
    result = CliRunner().invoke(cli, list(argv), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def torch_labels(model_dir: Path, texts: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**AutoTokenizer.from_pretrained(model_dir)(texts, return_tensors="pt", padding=True)).logits
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)]


def test_finetune_export_bench_package_predict(tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    train, dev = sentiment_csv
    out = invoke("finetune", "--model", str(tiny_bert), "--train", str(train), "--eval", str(dev),
                 "--out", str(tmp_path / "model"), "--epochs", "6", "--lr", "1e-2", "--batch-size", "16",
                 "--layer-lr-decay", "1", "--patience", "0", "--no-progress",
                 "--label-names", "negative,positive")
    accuracy = json.loads((tmp_path / "model" / "metrics.json").read_text())["eval"]["accuracy"]
    assert f"accuracy {accuracy:.4f}" in out and accuracy >= 0.85

    out = invoke("export", str(tmp_path / "model"), "--out", str(tmp_path / "export"), "--eval", str(dev),
                 "--bundle", str(tmp_path / "direct.tar.gz"))
    assert (tmp_path / "direct.tar.gz").is_file() and "bundle:" in out
    assert f"trade-off picture: {tmp_path / 'export' / 'export-tradeoff.png'}" in out
    report = json.loads((tmp_path / "export" / "export-report.json").read_text())
    assert {a["name"] for a in report["artifacts"]} >= {"fp32", "fused", "int8"}
    assert all(a["validated"] for a in report["artifacts"] if a["name"] in ("fp32", "fused"))

    invoke("bench", str(tmp_path / "export"), "--backends", "torch,fp32,int8", "--batch-sizes", "1,4",
           "--seq-lens", "16", "--runs", "3", "--no-cold-start", "--no-plots", "--data", str(dev),
           "--out", str(tmp_path / "bench"))
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [b["name"] for b in bench["backends"]] == ["torch", "fp32", "int8"]
    assert all(b["accuracy"]["accuracy"] >= 0.8 for b in bench["backends"])

    invoke("package", str(tmp_path / "export"), "--out", str(tmp_path / "bundle"))
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["provenance"]["recommended"] == report["recommended"]

    # predict in a fresh process: stdout is clean JSONL, the latency report goes to stderr
    texts = "the film was very good\n\nthe plot was awful and boring\n"
    want = torch_labels(tmp_path / "model", ["the film was very good", "the plot was awful and boring"])
    proc = subprocess.run([sys.executable, "-m", "bertedge", "predict", str(tmp_path / "bundle")],
                          input=texts.encode(), capture_output=True, check=True)
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3]
    assert [lines[0]["label"], lines[2]["label"]] == want and "error" in lines[1]
    assert "p50" in proc.stderr.decode() and "1 error record" in proc.stderr.decode()


def test_help_documents_every_verb() -> None:
    out = invoke("--help")
    for verb in ("finetune", "export", "bench", "package", "predict", "serve", "models"):
        assert verb in out
    assert "minilm" in invoke("models")


def test_runtime_options_are_one_group_with_one_meaning() -> None:
    """predict and serve take the same runtime options; --threads 0 reads the same in bench too."""
    import re

    from bertedge.cli import THREADS_HELP

    def options(verb: str) -> set[str]:
        return set(re.findall(r"^\s+(--[a-z-]+)", invoke(verb, "--help"), re.MULTILINE))

    group = {"--threads", "--providers", "--batch-size", "--aggregation", "--top-k", "--expect-digest"}
    assert group <= options("predict") and group <= options("serve")
    assert "--run-batch-size" not in options("serve")
    for verb in ("predict", "serve", "bench"):
        assert " ".join(THREADS_HELP.split()[:6]) in " ".join(invoke(verb, "--help").split()), verb
