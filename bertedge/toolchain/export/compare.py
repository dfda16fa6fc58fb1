"""The numbers export compares an artifact by, in numpy only: output differences, answers, agreement,
probabilities, batch invariance, and the inputs the timings use."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from bertedge.toolchain.export.report import BatchInvariance

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Run = Callable[[Feeds], Outputs]


def feed(feeds: Feeds, name: str) -> np.ndarray:
    """The input `name`, or zeros shaped like input_ids (token_type_ids a tokenizer left out)."""
    return feeds[name] if name in feeds else np.zeros_like(feeds["input_ids"])


def valid(x: np.ndarray, mask: np.ndarray, per_token: bool) -> np.ndarray:
    """Values at real tokens only: padding positions of per-token outputs are meaningless."""
    return x[mask.astype(bool)] if per_token else x


def max_abs_diff(ref: Sequence[Outputs], got: Sequence[Outputs], batches: Sequence[Feeds],
                 per_token: bool) -> float:
    """Largest |reference - candidate| over every output, batch and real position.

    >>> max_abs_diff([{"y": np.array([[1.0, 2.0]])}], [{"y": np.array([[1.5, 2.0]])}],
    ...              [{"attention_mask": np.array([[1]])}], per_token=False)
    0.5
    """
    diffs = [np.abs(valid(r[n], b["attention_mask"], per_token) - valid(g[n], b["attention_mask"], per_token))
             for r, g, b in zip(ref, got, batches, strict=True) for n in r]
    return float(max((d.max() for d in diffs if d.size), default=0.0))


def predictions(x: np.ndarray, mask: np.ndarray, per_token: bool) -> np.ndarray:
    """Argmax labels: one per row, one per real token (NER), or one position per row (QA span ends).

    >>> predictions(np.array([[1.0, 9.0, 5.0]]), np.array([[1, 0, 1]]), per_token=True).tolist()
    [2]
    """
    if not per_token:
        return x.argmax(-1)
    if x.ndim == 2:  # (batch, sequence) position scores: never pick a padding position
        return np.where(mask.astype(bool), x, -np.inf).argmax(-1)
    return x.argmax(-1)[mask.astype(bool)]


def agreement_counts(ref: Sequence[Outputs], got: Sequence[Outputs], batches: Sequence[Feeds],
                     per_token: bool) -> tuple[int, int]:
    """(answers equal, answers compared) between reference and candidate.

    Classification: labels per row; NER: labels per real token; QA (per-row position scores):
    spans per row, equal only when the start and the end position both are.
    """
    same = total = 0
    for r, g, b in zip(ref, got, batches, strict=True):
        spans: np.ndarray | None = None
        for n in r:
            a = predictions(r[n], b["attention_mask"], per_token)
            c = predictions(g[n], b["attention_mask"], per_token)
            if per_token and r[n].ndim == 2:
                spans = (a == c) if spans is None else spans & (a == c)
            else:
                same, total = same + int((a == c).sum()), total + a.size
        if spans is not None:
            same, total = same + int(spans.sum()), total + spans.size
    return same, total


def allowed_changes(min_agreement: float, compared: int) -> int:
    """How many answers the agreement budget lets change.

    >>> allowed_changes(0.995, 872)
    4
    """
    return int(np.floor((1.0 - min_agreement) * compared + 1e-9))


def probabilities(x: np.ndarray, mask: np.ndarray, per_token: bool) -> np.ndarray:
    """Softmax over classes (per row, or per real token), or over real positions (QA scores)."""
    if per_token and x.ndim == 2:
        x = np.where(mask.astype(bool), x, -np.inf)
    z = np.exp(x - x.max(-1, keepdims=True))
    p = z / z.sum(-1, keepdims=True)
    return p[mask.astype(bool)] if per_token and p.ndim == 3 else p


def rows(batches: Sequence[Feeds]) -> list[Feeds]:
    """Every row of `batches`, unpadded, as a batch of one."""
    out = []
    for b in batches:
        for r, n in enumerate(b["attention_mask"].sum(axis=1)):
            out.append({k: v[r:r + 1, :n] for k, v in b.items()})
    return out


def stack(unpadded: Sequence[Feeds], pad: int, width: int = 0) -> Feeds:
    """Right-pad unpadded rows to their longest (or `width`), like `pad_batch` does.

    >>> stack([{"input_ids": np.array([[5, 6]])}], pad=0, width=3)["input_ids"].tolist()
    [[5, 6, 0]]
    """
    width = max(width, *(r["input_ids"].shape[1] for r in unpadded))
    out = {}
    for k in unpadded[0]:
        fill = pad if k == "input_ids" else 0
        out[k] = np.full((len(unpadded), width), fill, dtype=np.int64)
        for i, r in enumerate(unpadded):
            out[k][i, :r[k].shape[1]] = r[k][0]
    return out


def batch_invariance(run: Run, probes: Sequence[Feeds], pool: Sequence[Feeds], pad: int, width: int,
                     per_token: bool, seed: int, tol: float) -> BatchInvariance:
    """The same text alone, in a batch with 31 random others, and padded to `width`.

    Returns the worst |probability difference| against the text alone, how many answers
    changed, and whether every difference stayed within `tol`.
    """
    rng = np.random.default_rng(seed)
    worst, changed = 0.0, 0
    for probe in probes:
        alone = run(probe)
        mates = [pool[int(i)] for i in rng.choice(len(pool), size=min(31, len(pool)), replace=True)]
        at = int(rng.integers(len(mates) + 1))
        batch = stack([*mates[:at], probe, *mates[at:]], pad)
        padded = stack([probe], pad, width)
        variants = [({k: v[at:at + 1] for k, v in run(batch).items()}, batch["attention_mask"][at:at + 1]),
                    (run(padded), padded["attention_mask"])]
        base_mask = probe["attention_mask"]
        n = base_mask.shape[1]
        for out, mask in variants:
            for name, ref in alone.items():
                got = out[name][:, :n] if per_token else out[name]
                p_ref, p_got = probabilities(ref, base_mask, per_token), probabilities(got, mask[:, :n], per_token)
                worst = max(worst, float(np.abs(p_ref - p_got).max()))
                changed += int((predictions(ref, base_mask, per_token) != predictions(got, mask[:, :n], per_token)).sum())
    return BatchInvariance(texts=len(probes), batch=min(31, len(pool)) + 1, padded_to=width, max_prob_diff=worst,
                           answers_changed=changed, passed=worst <= tol and changed == 0)


def target_feeds(unpadded: Sequence[Feeds], batch: int, seq: int, seed: int) -> Feeds:
    """`batch` rows of real tokens, each exactly `seq` long: real texts run together, no padding."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([r["input_ids"][0] for r in unpadded])
    types = np.zeros(seq, dtype=np.int64)
    starts = rng.integers(0, max(1, len(ids) - seq), size=batch)
    tiled = np.stack([np.resize(ids[s:], seq) for s in starts]).astype(np.int64)
    return {"input_ids": tiled, "attention_mask": np.ones_like(tiled), "token_type_ids": np.tile(types, (batch, 1))}


def cost_ms(timings_ms: dict[str, float]) -> float | None:
    """The geometric mean of the timings at the target shapes: what "fastest" compares.

    >>> cost_ms({"1x16": 1.0, "32x16": 4.0}), cost_ms({})
    (2.0, None)
    """
    return round(float(np.exp(np.mean(np.log(list(timings_ms.values()))))), 3) if timings_ms else None
