"""Machine facts recorded with every figure: CPU and ISA flags, cores, library versions, GPUs."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

from bertedge import __version__
from bertedge.runtime.bundle import cpu_model_and_flags
from bertedge.toolchain.bench.spec import ISA_FLAGS, LIBRARIES

# ----------------------------------------------------------------------------- environment


def cpu_facts() -> dict[str, Any]:
    """CPU model, cores and the ISA flags that decide INT8 speed and accuracy."""
    model, flags = cpu_model_and_flags()
    model = model if model != "unknown" else (platform.processor() or "unknown")
    return {"model": model, "logical_cores": os.cpu_count(), "physical_cores": _physical_cores(),
            "usable_cores": usable_cores(), "isa": {f: f in flags for f in ISA_FLAGS}}


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or the platform hides it
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def library_versions() -> dict[str, str | None]:
    """Installed versions (from package metadata, so nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "bertedge": __version__}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def gpu_memory_mb(pid: int) -> float | None:
    """GPU memory held by process `pid`, from nvidia-smi (None without a GPU or nvidia-smi)."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(mem) for p, _, mem in (line.partition(",") for line in text.splitlines())
            if p.strip() == str(pid) and mem.strip().replace(".", "").isdigit()]
    return sum(used) if used else None


def gpu_names() -> list[str]:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def environment() -> dict[str, Any]:
    """Machine facts recorded with every figure: CPU and ISA, memory, load, OS, GPUs, versions."""
    import onnxruntime as ort

    try:
        import psutil

        memory_gb: float | None = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil is optional
        memory_gb = None
    return {"cpu": cpu_facts(), "memory_gb": memory_gb, "load_average_start": list(os.getloadavg()),
            "os": platform.platform(), "gpus": gpu_names(), "onnxruntime_providers": ort.get_available_providers(),
            "versions": library_versions()}
