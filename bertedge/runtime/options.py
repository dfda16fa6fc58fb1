"""`RuntimeOptions`: how a loaded bundle runs, shared by `Predictor`, predict, serve and Ray.

One dataclass, one set of checks, one meaning per value: `threads=0` means "one intra-op thread
per CPU this process may use" everywhere (the engine's own default), never "auto" in one verb
and "unset" in another. The CLI builds it from one click option group (`bertedge.cli`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from bertedge.errors import BertedgeError

AGGREGATIONS = ("simple", "first", "max", "average")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a bundle runs; every field is checked in `__post_init__`."""

    threads: int = 0  # intra-op threads per session (0: the engine's default, one per usable CPU)
    providers: str | None = None  # cpu (default), auto, cuda, or a comma list of onnxruntime providers
    batch_size: int = 32  # items per inference batch
    aggregation: str = "first"  # NER: how sub-words become words (simple, first, max, average)
    top_k: int = 1  # QA: answer spans per question (the best is always "answer")
    max_answer_tokens: int = 30  # QA: the longest answer considered
    expect_digest: str | None = None  # refuse any bundle but the one with this digest
    spin: bool = True  # let idle onnxruntime threads busy-wait between runs (serve turns it off)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise BertedgeError("; ".join(problems), "fix the options above (see `bertedge predict --help`)")

    def problems(self) -> list[str]:
        """Every invalid field, one message each (empty when all are valid).

        >>> RuntimeOptions(batch_size=0)
        Traceback (most recent call last):
        ...
        bertedge.errors.BertedgeError: --batch-size must be at least 1 (got 0) -- fix the options above (see `bertedge predict --help`)
        """
        out = [f"--{name} must be at least {low} (got {value})" for name, value, low in (
            ("threads", self.threads, 0), ("batch-size", self.batch_size, 1), ("top-k", self.top_k, 1),
            ("max-answer-tokens", self.max_answer_tokens, 1)) if not _is_int(value) or value < low]
        if self.aggregation not in AGGREGATIONS:
            out.append(f"--aggregation must be one of {', '.join(AGGREGATIONS)} (got {self.aggregation!r})")
        return out

    @property
    def session_threads(self) -> int | None:
        """What a session factory takes: None for the engine's default (threads=0)."""
        return self.threads or None

    def replace(self, **changes: Any) -> RuntimeOptions:
        """A copy with some fields changed (checked again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return RuntimeOptions(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(name: str, value: float, low: float = 0.0) -> str | None:
    """The problem with a float option, or None: NaN and infinity are never valid values.

    >>> finite("--request-timeout", float("nan"))
    '--request-timeout must be a finite number >= 0 (got nan)'
    >>> finite("--atol", 1e-4) is None
    True
    """
    if not isinstance(value, int | float) or math.isnan(value) or math.isinf(value) or value < low:
        return f"{name} must be a finite number >= {low:g} (got {value})"
    return None
