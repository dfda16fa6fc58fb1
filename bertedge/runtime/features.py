"""Model inputs shared by training, validation, bench and the runtime (numpy + tokenizers only).

Every task turns its inputs into `Features`: one row per model window (a text, a sentence,
or one window of a long QA context) with unpadded token ids and the tokenizers `Encoding` that
maps tokens back to characters and words. Batches are padded here, once, for every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from bertedge.errors import BertedgeError

IGNORE = -100  # label id the loss skips (special tokens, later sub-words, padding)


@dataclass
class Features:
    """Model windows for a list of inputs."""

    encodings: list[Encoding]
    example_index: list[int]  # window -> index of the input it came from
    targets: list[Any] | None = None  # training targets per window (task-specific)
    truncated: list[bool] = field(default_factory=list)  # per input: did it lose tokens?

    def __len__(self) -> int:
        return len(self.encodings)


def load_tokenizer(path: Path) -> Tokenizer:
    """Load tokenizer.json with padding and truncation switched off (each task sets its own)."""
    if not path.is_file():
        raise BertedgeError(f"no tokenizer.json at {path}", "re-export the model or re-create the bundle")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise BertedgeError(f"{path} is not a valid tokenizer.json ({e})", "restore the file from the export folder") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def pad_id(tokenizer: Tokenizer) -> int:
    """The id of the padding token ([PAD] for BERT vocabularies), 0 when there is none."""
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def pad_batch(encodings: Sequence[Encoding], pad: int = 0) -> dict[str, np.ndarray]:
    """Right-pad a batch to its longest window; int64 arrays named like the graph inputs."""
    width = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), width), pad, dtype=np.int64)
    types = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        ids[row, :n] = enc.ids
        types[row, :n] = enc.type_ids
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (less padding); callers restore input order.

    >>> list(length_sorted_batches([5, 1, 3, 2], 2))
    [[1, 3], [2, 0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def run_windows(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], features: Features,
                pad: int, per_token: bool, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """Run `run(feeds) -> {output name: array}` over every window, length-sorted.

    Returns one dict per window, in window order; per-token outputs are cut to the window's
    own length so padding never reaches post-processing.
    """
    out: list[dict[str, np.ndarray]] = [{} for _ in range(len(features))]
    lengths = [len(e.ids) for e in features.encodings]
    for idx in length_sorted_batches(lengths, batch_size):
        results = run(pad_batch([features.encodings[i] for i in idx], pad))
        for row, i in enumerate(idx):
            out[i] = {k: v[row, :lengths[i]] if per_token else v[row] for k, v in results.items()}
    return out
