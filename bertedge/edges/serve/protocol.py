"""`PredictorLike`: everything the server uses of `bertedge.runtime.Predictor`, and nothing else.

The server never reaches into the predictor's insides (its tokenizer, session or manifest):
tests pass fakes that implement exactly these members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from bertedge.runtime.records import Pair
from bertedge.runtime.tasks import Result


class PredictorLike(Protocol):
    """What the server needs from a predictor."""

    @property
    def task_name(self) -> str:
        """classification, ner or qa."""

    @property
    def labels(self) -> tuple[str, ...]:
        """The model's labels, in index order."""

    @property
    def max_length(self) -> int:
        """Tokens per model window; longer items are truncated."""

    @property
    def providers(self) -> list[str]:
        """The execution providers the session uses (CPU or GPU picks the run batch size)."""

    @property
    def example_item(self) -> Pair:
        """An item the model accepts, for the warm-up."""

    @property
    def digest(self) -> str:
        """The bundle's digest, sent with every prediction."""

    def check(self, item: Pair) -> Pair | str:
        """The item, or what is wrong with it for this model (empty text, QA without context...)."""

    def count_tokens(self, items: Sequence[Pair]) -> list[int]:
        """Padded tokens per item, with the predictor's own tokenizer and max length."""

    def predict_isolated(self, items: Sequence[Pair], batch_size: int | None = None) -> list[Result]:
        """One result per item, in order; an item that fails gives {"error": why} alone."""

    def model_files(self) -> dict[str, str]:
        """The model's files, graph first, name -> SHA-256 (any engine)."""

    def describe(self) -> dict[str, Any]:
        """The bundle's facts: task, labels, precision, engine, checksums, ... (GET /v1/model)."""

    def output_schema(self) -> dict[str, Any]:
        """The fields of one prediction."""
