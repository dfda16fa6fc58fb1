"""Every script under benchmarks/ imports and answers --help, so none can rot unnoticed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def test_there_are_scripts() -> None:
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_imports_and_help(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"benchmark_{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up here
    spec.loader.exec_module(module)  # module level: every import resolves
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()


@pytest.mark.slow
def test_mypy_finds_no_missing_names() -> None:
    """An attribute that moved or vanished (bench.session_options, ...) fails here, not at `make bench`."""
    mypy = Path(sys.executable).parent / "mypy"
    if not mypy.is_file():
        pytest.skip("mypy is not installed")
    done = subprocess.run([str(mypy), "--ignore-missing-imports", "--follow-imports=silent", str(BENCHMARKS)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout


def test_head_to_head_reports_each_contenders_batch_invariance(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                                                               cascade_export: tuple[Path, Any],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """On the tiny model (no Optimum or OpenVINO peers): export's invariance check beside each speed,
    and another export's cascade (`--also-export`) timed as one more contender."""
    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    _, dev = sentiment_csv
    export(ExportArgs(tiny_bert, tmp_path / "export", optimization=Optimization.NONE, quantize=Quantization.NONE,
                      cascade=False, sensitivity=False, timing_seconds=0.02, timing_rounds=0, threads=1,
                      openvino="off"))
    spec = importlib.util.spec_from_file_location("benchmark_head_to_head", BENCHMARKS / "head_to_head.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "benchmark_head_to_head", module)
    spec.loader.exec_module(module)
    result = module.main(["--model", str(tiny_bert), "--export", str(tmp_path / "export"), "--data", str(dev),
                          "--results-dir", str(tmp_path / "results"), "--no-optimum", "--no-openvino", "--rounds", "1",
                          "--duration", "0.01", "--warmup", "1", "--batch1-rows", "3", "--invariance-texts", "4",
                          "--threads", "1", "--also-export", str(cascade_export[0])])
    other = f"bertedge-cascade-{cascade_export[0].name}"
    assert set(result["contenders"]) == {"torch-eager", "bertedge-fp32", other}
    assert result["contenders"][other]["recipe"].startswith("bertedge cascade ") and other in result["targets"]
    for row in result["contenders"].values():
        inv = row["batch_invariance"]
        assert inv["texts"] == 4 and inv["batch"] == 32 and inv["padded_to"] == 128 and inv["answers_changed"] == 0
    printed = capsys.readouterr().out
    assert "batch-invariant: max abs prob diff (answers changed)" in printed
    for name in result["contenders"]:  # the last column of each contender's row: passed, worst diff (changed)
        assert re.search(rf"^\| {name} \|.* \| (yes|no): [0-9.e+-]+ \(0\) \|$", printed, re.MULTILINE), printed
