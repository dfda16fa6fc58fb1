"""CUDA provider messages on a machine without onnxruntime's CUDA provider.

Asking for `cuda` fails fast with one error naming the install command the README gives; `auto`
runs on the CPU, warning only where a GPU build was installed but is not the one imported; a
session that dropped CUDA says why. Nothing here needs a GPU: on a working GPU build the tests that
assume CUDA is absent skip.
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from pathlib import Path

import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime import sessions
from bertedge.runtime.predictor import Predictor
from bertedge.runtime.sessions import (
    CPU,
    CUDA,
    GPU_INSTALL,
    ORT_GPU,
    make_session,
    resolve_providers,
)

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
# The CPU build's own note when handed CUDA; what these tests read is bertedge's warning after it.
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-node graph with BERT-style int64 inputs: enough for a session, no model needed."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "attention_mask")]
    nodes = [helper.make_node("Mul", ["input_ids", "attention_mask"], ["kept"]),
             helper.make_node("Cast", ["kept"], ["kept_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["kept_f"], ["logits"], keepdims=1)]
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_the_fix_is_the_readme_command_and_the_gpu_extra_pins_the_same_build() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert GPU_INSTALL in readme
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    gpu_extra = re.search(r"^gpu = \[(.*?)\]", pyproject, re.M | re.S)
    assert gpu_extra and re.findall(r'"([^"]+)"', gpu_extra.group(1)) == [ORT_GPU]


@pytest.mark.parametrize("requested", ["cuda", ["cuda"], "cuda,cpu", ["CUDAExecutionProvider", "cpu"]])
def test_explicit_cuda_fails_fast_with_one_error_naming_the_install(requested: str | list[str]) -> None:
    with pytest.raises(BertedgeError) as caught:
        resolve_providers(requested, [CPU])
    error = caught.value
    assert "CUDAExecutionProvider is not available" in error.problem
    assert f"{ort.__version__}" in error.problem and "available: CPUExecutionProvider" in error.problem
    assert GPU_INSTALL in error.fix and "--providers cpu or auto" in error.fix
    assert "\n" not in str(error)


def test_another_missing_provider_gets_no_cuda_advice() -> None:
    with pytest.raises(BertedgeError) as caught:
        resolve_providers("tensorrt", [CPU])
    assert "TensorrtExecutionProvider is not available" in caught.value.problem
    assert "onnxruntime-gpu" not in caught.value.fix


@NO_CUDA
def test_predictor_refuses_cuda_before_opening_the_bundle(tmp_path: Path) -> None:
    with pytest.raises(BertedgeError, match="CUDAExecutionProvider is not available") as caught:
        Predictor(tmp_path / "no-such-bundle", providers="cuda")
    assert GPU_INSTALL in caught.value.fix


@NO_CUDA
def test_cli_cuda_exits_with_one_line_naming_the_install(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["predict", str(tmp_path), "--providers", "cuda", "a film"])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "CUDAExecutionProvider is not available" in errors[0]
    assert GPU_INSTALL in errors[0]


@NO_CUDA
def test_auto_on_the_cpu_build_is_cpu_without_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "shadowed_gpu_build", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_providers("auto") == [CPU]


def test_auto_warns_when_the_cpu_build_replaced_an_installed_gpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "shadowed_gpu_build", lambda: "1.31.1")
    with pytest.warns(RuntimeWarning, match="'auto' runs on the CPU") as caught:
        assert resolve_providers("auto", [CPU]) == [CPU]
    text = str(caught[0].message)
    assert "onnxruntime-gpu 1.31.1 is installed too" in text and GPU_INSTALL in text


def test_shadowed_gpu_build_reads_the_installed_distributions() -> None:
    try:
        installed: str | None = importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    imported_gpu_build = getattr(ort, "package_name", "onnxruntime") == "onnxruntime-gpu"
    assert sessions.shadowed_gpu_build() == (None if imported_gpu_build else installed)


@NO_CUDA
def test_a_session_that_drops_cuda_on_the_cpu_build_names_the_install(tiny_onnx: Path) -> None:
    with pytest.warns(RuntimeWarning, match="could not use CUDAExecutionProvider and fell back") as caught:
        session = make_session(tiny_onnx, [CUDA, CPU], threads=1)
    assert session.get_providers() == [CPU]
    text = " ".join(str(w.message) for w in caught)
    assert "has no CUDA provider" in text and GPU_INSTALL in text


def test_a_gpu_build_without_cuda_libraries_points_at_them(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback text a GPU build gives when its CUDA provider cannot load (checked for real with
    onnxruntime-gpu 1.31.1 on a CPU-only machine); here the build's facts are patched in."""
    if CUDA in ort.get_available_providers():
        pytest.skip("a real GPU build: the message is whatever its CUDA libraries give")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "cuda_version", "13.0", raising=False)
    with pytest.warns(RuntimeWarning, match="could not use CUDAExecutionProvider") as caught:
        make_session(tiny_onnx, [CUDA, CPU], threads=1)
    text = " ".join(str(w.message) for w in caught)
    assert "CUDA 13.0 and cuDNN libraries" in text and "print_debug_info()" in text
    assert GPU_INSTALL not in text
