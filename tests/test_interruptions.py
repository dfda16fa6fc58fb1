"""Issue 24, random interruptions: SIGTERM or SIGKILL at a random moment of `package` and of
`predict --out`, then the same command again (a user's retry).

Whatever the moment: no traceback; the destination holds either nothing or a whole, valid output
(a bundle that verifies, one prediction per input row), never a partial one under its name; the
retry succeeds and leaves no partial or lock file behind, including those of a SIGKILLed run.
(Export's SIGTERM is `test_export.test_sigterm_during_export_leaves_no_partial_folder`; Ray's is
`test_ray_hardening.test_13_...`.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_matrix import task_bundle
from test_ray_hardening import leftovers, texts

from bertedge.runtime.bundle import verify_bundle

CLI = str(Path(sys.executable).parent / "bertedge")
ROWS = 60_000  # about 2 s of `predict` on the tiny model: most drawn moments land inside it


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    bundle = task_bundle(root, "classification")
    scratch = tmp_path_factory.mktemp("interrupted")
    data = scratch / "in.txt"
    data.write_text("\n".join(texts(ROWS)) + "\n", encoding="utf-8")
    return {"bundle": bundle, "export": root / "export-classification", "input": data, "scratch": scratch}


def interrupted(command: list[str], after_s: float, signum: int) -> tuple[int, str]:
    """Run `command`, send `signum` after `after_s` seconds (unless it ended): (exit status, stderr)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def check_ended(code: int, stderr: str, signum: int) -> None:
    assert "Traceback" not in stderr, stderr[-4000:]
    assert code in (0, 128 + signum, -signum), (code, stderr[-2000:])
    if code == 128 + signum:  # SIGTERM handled by bertedge: one closing line naming what was not written
        assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: "), stderr


def predictions_whole(out: Path) -> bool:
    lines = out.read_text(encoding="utf-8").splitlines()
    return len(lines) == ROWS and all("label" in json.loads(x) for x in lines)


SIGNALS = st.sampled_from([signal.SIGTERM, signal.SIGKILL])


@settings(max_examples=6)
@given(moment=st.tuples(st.floats(0.02, 0.4), SIGNALS))  # `package` of the tiny export takes ~0.3 s
def test_package_interrupted_anywhere_then_rerun(work: dict[str, Path], moment: tuple[float, int]) -> None:
    after_s, signum = moment
    folder = work["scratch"] / f"package-{time.monotonic_ns()}"
    folder.mkdir()
    out = folder / "bundle"
    command = [CLI, "package", str(work["export"]), "--out", str(out)]
    code, stderr = interrupted(command, after_s, signum)
    check_ended(code, stderr, signum)
    if out.exists():  # the whole bundle or nothing under its name
        verify_bundle(out)
    if code in (0, 128 + signum):
        assert leftovers(folder) == []  # a handled SIGTERM cleans up at once; a kill leaves it to the retry
    again = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    verify_bundle(out)
    assert leftovers(folder) == []


@settings(max_examples=6)
@given(moment=st.tuples(st.floats(0.05, 2.5), SIGNALS))
def test_predict_out_interrupted_anywhere_then_rerun(work: dict[str, Path], moment: tuple[float, int]) -> None:
    after_s, signum = moment
    folder = work["scratch"] / f"predict-{time.monotonic_ns()}"
    folder.mkdir()
    out = folder / "p.jsonl"
    command = [CLI, "predict", str(work["bundle"]), "-i", str(work["input"]), "--out", str(out), "--threads", "1"]
    code, stderr = interrupted(command, after_s, signum)
    check_ended(code, stderr, signum)
    if out.exists():
        assert predictions_whole(out)  # never a partial file under the output's name
    if code in (0, 128 + signum):
        assert leftovers(folder) == []
    again = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert predictions_whole(out) and leftovers(folder) == []
