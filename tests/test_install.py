"""The install a user does: build the wheel, install it in fresh venvs, predict and serve.

Slow (pip resolves and installs onnxruntime, tokenizers, numpy, FastAPI, uvicorn: about a
minute, more on a busy machine; downloads are cached by pip after the first run), so marked
`slow`; `make test` runs it. Needs PyPI (or the configured index) to be reachable.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*cmd: str | Path, timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure show its output (pip's reasons are in it)."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                            **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (setuptools writes build/ beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bertedge", src / "bertedge", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src)
    (found,) = out.glob("bertedge-*.whl")
    return found


@pytest.fixture(scope="module")
def tiny_bundle(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bertedge.runtime.bundle import PackageArgs, package
    from bertedge.toolchain.export import ExportArgs, Optimization, Quantization, export

    base = tmp_path_factory.mktemp("install")
    export(ExportArgs(tiny_bert, base / "export", optimization=Optimization.NONE, quantize=Quantization.NONE))
    return package(PackageArgs(base / "export", base / "bundle.tar.gz")).root


def fresh_venv(path: Path, requirement: str) -> Path:
    """A new venv (no system site-packages) with `requirement` installed; its python."""
    venv.create(path, with_pip=True, clear=True)
    python = path / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", requirement)
    return python


def site_packages_mb(python: Path) -> dict[str, float]:
    """MB on disk per top-level entry of the venv's site-packages (largest first)."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", code).stdout.strip())
    sizes = {entry.name: sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) / 1e6
             if entry.is_dir() else entry.stat().st_size / 1e6 for entry in site.iterdir()}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def clean_env() -> dict[str, str]:
    """No PYTHONPATH or venv leaking in from the test run."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_runtime_only_install_predicts(wheel: Path, tiny_bundle: Path, tmp_path: Path,
                                       record_property: Callable[[str, object], None]) -> None:
    python = fresh_venv(tmp_path / "runtime", str(wheel))
    code = ("import importlib.util as u, json, sys\n"
            "from bertedge.runtime import Predictor\n"
            f"p = Predictor({str(tiny_bundle)!r}, threads=1)\n"
            "out = p.predict(['a good film', 'a dull plot'])\n"
            "absent = [m for m in ('torch', 'transformers', 'fastapi', 'onnx') if u.find_spec(m)]\n"
            "print(json.dumps({'labels': [r['label'] for r in out], 'installed': absent}))\n")
    result = json.loads(run(python, "-c", code, env=clean_env(), cwd=tmp_path).stdout)
    assert set(result["labels"]) <= {"negative", "positive"} and len(result["labels"]) == 2
    assert result["installed"] == []  # the runtime install pulls no build-side or serve packages
    cli = run(tmp_path / "runtime" / "bin" / "bertedge", "predict", tiny_bundle, "a good film", "-q",
              env=clean_env(), cwd=tmp_path)
    assert json.loads(cli.stdout.splitlines()[0])["label"] in ("negative", "positive")
    serve = subprocess.run([str(tmp_path / "runtime" / "bin" / "bertedge"), "serve", str(tiny_bundle)],
                           capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=120)
    assert serve.returncode != 0 and "pip install 'bertedge[serve]'" in serve.stderr
    sizes = site_packages_mb(python)
    size = sum(sizes.values())
    record_property("runtime_site_packages_mb", round(size, 1))
    largest = ", ".join(f"{name} {mb:.1f}" for name, mb in list(sizes.items())[:6])
    print(f"\nruntime-only venv: site-packages {size:.1f} MB (largest, MB: {largest})")
    assert size < 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_install_answers_a_request(wheel: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    fresh_venv(tmp_path / "serve", f"{wheel}[serve]")
    port = free_port()
    server = subprocess.Popen([str(tmp_path / "serve" / "bin" / "bertedge"), "serve", str(tiny_bundle),
                               "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        request = urllib.request.Request(f"{url}/v1/predict", data=b'{"texts": ["a good film"]}',
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            body = json.loads(r.read())
        assert body["predictions"][0]["label"] in ("negative", "positive")
        assert body["model"]["task"] == "classification"
    finally:
        server.terminate()
        server.wait(30)
