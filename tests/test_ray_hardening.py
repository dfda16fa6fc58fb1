"""Regression tests for the `predict --engine ray` and input defects of issue 24, grouped by cause.

Numbers are the issue's. The Ray jobs share the session's local 2-CPU Ray (`test_matrix.ray_local`);
the SIGTERM test starts its own Ray in a subprocess, as a user would.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_matrix import ray_local, task_bundle
from tiny import sentiment_rows, write_jsonl

from bertedge.errors import BertedgeError
from bertedge.runtime.options import RuntimeOptions
from bertedge.runtime.records import InputFormat, input_problem, read_records

__all__ = ["ray_local"]  # the shared session fixture, imported for pytest
WRONG_DIGEST = "0" * 64
NO_TEXT = ["\x00", "\x00\x00\x00", "\x01\x02\x7f", "\u200b", "\u200b\u200d\ufeff", " \x00\t\u2060 "]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    return task_bundle(root, "classification")


def texts(n: int, seed: int = 11) -> list[str]:
    return [t for t, _ in sentiment_rows(n, seed=seed)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def leftovers(folder: Path) -> list[str]:
    """Partial outputs or locks left in a folder."""
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name.endswith(".lock"))


def ray_args(bundle: Path, inputs: list[Path], out: Path, **kwargs: Any) -> Any:
    from bertedge.edges.ray import DistributedArgs

    runtime = kwargs.pop("runtime", RuntimeOptions(batch_size=8))
    return DistributedArgs(bundle=bundle, inputs=[str(p) for p in inputs], output=out, actors=1,
                           progress=False, runtime=runtime, **kwargs)


# ----------------------------------------------------------------------------- 1: --expect-digest


def test_1_wrong_digest_fails_before_any_row_is_written(bundle: Path, tmp_path: Path) -> None:
    from bertedge.edges.ray import predict_dataset

    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(5)])
    out = tmp_path / "out" / "p.jsonl"
    with pytest.raises(BertedgeError, match="digest") as e:
        predict_dataset(ray_args(bundle, [path], out, runtime=RuntimeOptions(expect_digest=WRONG_DIGEST)))
    assert "\n" not in str(e.value)
    assert not out.parent.exists()  # checked on the driver before the output or Ray was touched


def test_1_actors_load_through_the_verified_path(bundle: Path) -> None:
    """An actor given a wrong pin refuses the bundle itself (the same `Predictor` as local predict)."""
    from bertedge.edges.ray import BundlePredictor

    with pytest.raises(BertedgeError, match="digest"):
        BundlePredictor(str(bundle), None, RuntimeOptions(expect_digest=WRONG_DIGEST))


def test_1_cli_refuses_a_wrong_pin_in_one_line(bundle: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(5)])
    out = tmp_path / "p.jsonl"
    from bertedge.cli import cli

    result = CliRunner().invoke(cli, ["predict", str(bundle), "--engine", "ray", "--input", str(path),
                                      "--out", str(out), "--expect-digest", WRONG_DIGEST, "-q"])
    assert result.exit_code != 0 and "digest" in result.output, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 2, 3, 6, 18: rows


def test_2_failed_inference_gives_error_rows_not_a_dead_job(bundle: Path, ray_local: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from bertedge.edges.ray import FAULT_TEXT_ENV, predict_dataset

    rows = texts(60)
    poisoned = {5, 31, 47}
    for i in poisoned:
        rows[i] = f"POISON {rows[i]}"
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in rows])
    monkeypatch.setenv(FAULT_TEXT_ENV, "POISON")
    out = tmp_path / "p.jsonl"
    report = predict_dataset(ray_args(bundle, [path], out))
    assert report.rows_in == 60 and report.rows_ok == 57 and report.rows_error == 3
    errors = read_jsonl(Path(f"{out}.errors.jsonl"))
    assert [e["row"] for e in errors] == sorted(poisoned)
    assert all(e["reason"].startswith("inference failed (RuntimeError") for e in errors)
    assert len(read_jsonl(out)) == 57  # the rest of each poisoned window was still predicted


def test_3_6_18_big_ids_empty_lines_and_overwrite(bundle: Path, ray_local: Any, tmp_path: Path) -> None:
    """One job: an id of 10**30 among 2,000 rows (3), lines with no visible text (6), and an
    existing --out that is refused, then replaced with overwrite (18)."""
    from bertedge.edges.ray import predict_dataset

    rows: list[dict[str, Any]] = [{"id": i, "text": t} for i, t in enumerate(texts(2000))]
    rows[1500]["id"] = 10**30
    for i, junk in enumerate(NO_TEXT):
        rows[100 + i]["text"] = junk
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "p.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    Path(f"{out}.errors.jsonl").write_text("stale\n", encoding="utf-8")
    with pytest.raises(BertedgeError, match="exists .pass --overwrite"):
        ray_args(bundle, [path], out)
    assert out.read_text(encoding="utf-8") == "precious\n"

    report = predict_dataset(ray_args(bundle, [path], out, overwrite=True,
                                      runtime=RuntimeOptions(batch_size=64)))
    assert report.rows_in == 2000 and report.rows_error == 1 + len(NO_TEXT)
    errors = {e["row"]: e for e in read_jsonl(Path(f"{out}.errors.jsonl"))}
    assert "does not fit a 64-bit integer" in errors[1500]["reason"]
    assert all(errors[100 + i]["reason"] == "empty text" for i in range(len(NO_TEXT)))
    got = read_jsonl(out)
    assert len(got) == 2000 - report.rows_error and got[0]["id"] == 0 and isinstance(got[-1]["id"], int)
    assert leftovers(tmp_path) == []


def test_6_no_text_lines_are_error_records_in_every_format() -> None:
    """NUL-only, control-only and zero-width-only lines are empty, like blank ones (local engine too)."""
    lines = ["fine", *NO_TEXT]
    cases = {
        InputFormat.TXT: "\n".join(lines),
        InputFormat.JSONL: "\n".join(json.dumps({"text": t}) for t in lines),
        InputFormat.CSV: "text\n" + "\n".join(f'"{t}"' for t in lines),
    }
    for fmt, data in cases.items():
        records = list(read_records(io.BytesIO(data.encode()), fmt))
        assert records[0].item == ("fine", None), fmt
        assert len(records) == len(lines), fmt
        assert all(r.item is None and r.error in ("empty line", "empty text") for r in records[1:]), (fmt, records)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be"])
def test_6_utf16_files_are_decoded_not_half_predicted(codec: str) -> None:
    lines = ["a gripping film", "é 🙂 ਊ", "", "last"]
    body = "\r\n".join(lines).encode(codec)
    bom = {"utf-16": b"", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}[codec]
    records = list(read_records(io.BytesIO(bom + body), InputFormat.TXT))
    assert [r.item[0] if r.item else r.error for r in records] == ["a gripping film", "é 🙂 ਊ", "empty line", "last"]
    jsonl = (bom + "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in lines[:2]).encode(codec))
    assert [r.item for r in read_records(io.BytesIO(jsonl), InputFormat.JSONL)] == [(t, None) for t in lines[:2]]


def test_6_ray_reads_utf16_like_utf8(bundle: Path, ray_local: Any, tmp_path: Path) -> None:
    from bertedge.edges.ray import predict_dataset

    lines = [*texts(20), "\x00\x00", *texts(5, seed=2)]
    utf8 = tmp_path / "a.txt"
    utf8.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-16"))
    out = tmp_path / "out" / "p.jsonl"
    report = predict_dataset(ray_args(bundle, [tmp_path / "a.txt", tmp_path / "b.txt"], out))
    assert report.rows_in == 2 * len(lines) and report.rows_error == 2
    got = read_jsonl(out)
    by_file = [[r["label"] for r in got if r["file"].endswith(name)] for name in ("a.txt", "b.txt")]
    assert by_file[0] == by_file[1] and len(by_file[0]) == len(lines) - 1


# ----------------------------------------------------------------------------- 7: unwritable --out


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nothing can be created in (chmod does not stop root: /sys refuses even root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            os.close(os.open(candidate / ".bertedge-probe", os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            return candidate
        (candidate / ".bertedge-probe").unlink()
    pytest.skip("no unwritable folder on this machine")


def test_7_read_only_out_is_one_line_and_leaves_nothing(bundle: Path, tmp_path: Path) -> None:
    from bertedge.edges.ray import predict_dataset

    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(5)])
    folder = unwritable_folder(tmp_path)
    out = folder / "p-bertedge-test.jsonl"
    with pytest.raises(BertedgeError, match="cannot write the predictions") as e:
        predict_dataset(ray_args(bundle, [path], out))
    assert "\n" not in str(e.value) and not out.exists()


def test_7_full_disk_is_one_line_and_leaves_no_partial(bundle: Path, ray_local: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import bertedge.edges.ray.writer as writer
    from bertedge.edges.ray import predict_dataset

    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(40)])
    real_sink = writer.table_sink

    def full_disk(target: Path | None, fmt: Any) -> Any:
        sink = real_sink(target, fmt)

        class Full:
            def __enter__(self) -> Any:
                write = sink.__enter__()

                def fail(table: Any) -> None:
                    write(table)
                    raise OSError(errno.ENOSPC, "No space left on device")

                return fail

            def __exit__(self, *exc: Any) -> Any:
                return sink.__exit__(*exc)

        return Full()

    monkeypatch.setattr(writer, "table_sink", full_disk)
    out = tmp_path / "out" / "p.jsonl"
    with pytest.raises(BertedgeError, match="No space left on device") as e:
        predict_dataset(ray_args(bundle, [path], out))
    assert "\n" not in str(e.value)
    assert not out.exists() and leftovers(out.parent) == [] and not Path(f"{out}.partial").exists()


# ----------------------------------------------------------------------------- 17: pipes, devices, folders


def test_17_input_paths_pipes_devices_and_folders(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert input_problem(fifo) is None and input_problem(Path("/dev/null")) is None
    assert input_problem(Path("/dev/stdin")) is None
    assert "is a folder" in (input_problem(tmp_path) or "")
    assert "does not exist" in (input_problem(tmp_path / "nope.txt") or "")


def test_17_ray_reads_a_pipe_and_names_an_empty_device(bundle: Path, ray_local: Any, tmp_path: Path) -> None:
    from bertedge.edges.ray import predict_dataset

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    lines = texts(12)

    def feed() -> None:
        with fifo.open("w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    out = tmp_path / "p.jsonl"
    report = predict_dataset(ray_args(bundle, [fifo], out))
    writer.join(5)
    assert report.rows_in == report.rows_ok == 12 and [r["line"] for r in read_jsonl(out)] == list(range(1, 13))

    with pytest.raises(BertedgeError, match="no rows.*/dev/null.*empty"):
        predict_dataset(ray_args(bundle, [Path("/dev/null")], tmp_path / "q.jsonl"))
    assert not (tmp_path / "q.jsonl").exists()


# ----------------------------------------------------------------------------- 13: SIGTERM, SIGINT


def ray_processes(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def names(processes: list[Any]) -> list[str]:
    import psutil

    out = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            out.append(" ".join(p.cmdline()) or p.name())
    return out


@pytest.mark.parametrize(("signum", "code", "said"), [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                                      (signal.SIGINT, 130, "stopped by an interrupt")])
def test_13_a_signal_shuts_ray_down_and_exits_in_one_line(bundle: Path, tmp_path: Path, signum: int, code: int,
                                                          said: str) -> None:
    """SIGTERM (Ctrl-C: SIGINT) while the actors predict: 143 (130), one line, Ray's processes gone."""
    import psutil

    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts(40_000)) + "\n", encoding="utf-8")
    out = tmp_path / "p.jsonl"
    cli = Path(sys.executable).parent / "bertedge"
    command = [str(cli), "predict", str(bundle), "--engine", "ray", "--input", str(path), "--out", str(out),
               "--actors", "1", "--batch-size", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, children = time.monotonic() + 120, []
        while time.monotonic() < deadline and proc.poll() is None:
            if any("MapWorker" in name for name in names(ray_processes(proc.pid))):
                break  # the predictor actor is up: Ray is fully started and predicting
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        children = ray_processes(proc.pid)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr[-6000:]
    assert stderr.strip().splitlines()[-1].startswith(said), stderr
    _, alive = psutil.wait_procs(children, timeout=30)
    assert names([p for p in alive if p.is_running()]) == []
    assert not out.exists() and leftovers(tmp_path) == []
