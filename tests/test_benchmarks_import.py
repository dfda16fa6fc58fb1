"""Every script under benchmarks/ imports and answers --help, so none can rot unnoticed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

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
