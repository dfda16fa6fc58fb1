from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings
from tiny import make_tiny_model, sentiment_rows, write_csv

if TYPE_CHECKING:
    from bertedge.toolchain.export import ExportReport

# Property tests: the CI gate replays the same derandomized examples every run (a red CI means
# the change broke something, never that a new random draw found an old bug). To explore new
# inputs, run `HYPOTHESIS_PROFILE=explore make test` and turn what it finds into a fixed test.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Export times every artifact for 1 s per shape by default: real figures, ~25 s of a tiny export.
# No test asserts a timing, so the suite (and its subprocesses) time each for 0.02 s: every
# timing path still runs, at least three calls each. Set it in the environment to override.
os.environ.setdefault("BERTEDGE_TIMING_SECONDS", "0.02")
# Export measures each artifact's cold start and peak RSS in a fresh process (~1 s each): off in
# the suite; test_footprint turns it on for one export.
os.environ.setdefault("BERTEDGE_FOOTPRINT", "0")


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access and caches in tmp_path: a test that tries to download fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT sequence classifier (read-only: copy before changing it)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"), arch="bert")


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DistilBERT sequence classifier (no token_type_ids)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_distilbert"), arch="distilbert")


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.csv, eval.csv) of learnable synthetic sentiment data."""
    d = tmp_path_factory.mktemp("data")
    return (write_csv(d / "train.csv", sentiment_rows(200, seed=1)),
            write_csv(d / "eval.csv", sentiment_rows(60, seed=2)))


@pytest.fixture(scope="session")
def cascade_export(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportReport]:
    """One static-INT8 export of the tiny BERT with --eval and --agreement-data (a cascade row),
    two target shapes and its footprint measured: read-only (copy before changing it), shared by
    the cascade, trade-off picture and footprint tests."""
    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    train, dev = sentiment_csv
    out = tmp_path_factory.mktemp("cascade") / "export"
    report = export(ExportArgs(tiny_bert, out, optimization=Optimization.NONE, quantize=Quantization.STATIC,
                               eval_file=dev, calibration=train, calibration_rows=40, agreement_data=train,
                               agreement_rows=100, sensitivity=False, targets=((1, 16), (4, 32)),
                               timing_seconds=0.02, timing_rounds=1, threads=1, footprint=True))
    return out, report
