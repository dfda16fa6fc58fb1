"""export-tradeoff.png: the agreement / speed trade-off of an export, one panel per target shape.

Each panel puts every candidate at its p50 ms at that shape (log scale) against its answers equal
to PyTorch's (%): the artifacts by name, the INT8 recipes the ladders tried as c1, c2... (named in
a key under the panels; a recipe kept as an artifact is drawn once, under the artifact's name);
passed filled, failed hollow, the recommended one a star; a line at the agreement budget. A
cascade adds its delta curve: at each delta, the cost `price_curves` estimated from the stages'
timings (stage 1's ms + escalated share x the later stages' ms), beside the cascade as measured
on real texts (its own row), the chosen delta ringed.

matplotlib (Agg) is imported inside `plot_tradeoff`: export's other work never needs it.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertedge.runtime.artifacts import CASCADE, ONNXRUNTIME
from bertedge.toolchain.export.report import ArtifactReport, CandidateRow, ExportReport

TRADEOFF_FILE = "export-tradeoff.png"
NINES_FLOOR = 0.01  # % of answers changed that the y scale adds before its log: where 100 % sits
COLORS = {ONNXRUNTIME: "tab:blue", "openvino": "tab:orange", CASCADE: "tab:green"}
# Where a label may go around its point (offset in points, alignment), tried in this order.
LABEL_SPOTS = ((6, 3, "left", "bottom"), (6, -3, "left", "top"), (-6, 3, "right", "bottom"),
               (-6, -3, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top"),
               (14, 12, "left", "bottom"), (14, -12, "left", "top"), (-14, 12, "right", "bottom"),
               (-14, -12, "right", "top"), (0, 20, "center", "bottom"), (0, -20, "center", "top"))


@dataclass(frozen=True)
class Point:
    """One candidate as drawn: its label, engine, verdict and figures."""

    label: str
    engine: str
    passed: bool
    recommended: bool
    agreement: float  # 0..1
    timings_ms: dict[str, float]
    recipe: bool = False  # one of the INT8 recipes tried (cN), not an artifact


def write_tradeoff(report: ExportReport, folder: Path, min_agreement: float) -> Path | None:
    """`plot_tradeoff` into `folder`; a failure never fails the export: it becomes one line of
    `report.warnings` (and None)."""
    try:
        return plot_tradeoff(report, folder / TRADEOFF_FILE, min_agreement)
    except Exception as e:  # noqa: BLE001 - any plotting failure only costs the picture
        first_line = (str(e).splitlines() or [""])[0]
        report.warnings.append(f"{TRADEOFF_FILE} not written: {type(e).__name__}: {first_line}")
        return None


def plot_tradeoff(report: ExportReport, path: Path, min_agreement: float) -> Path:
    """Write the trade-off picture (see the module docstring) to `path`.

    Args:
        report: the export's report (`export`'s, or `ExportReport.from_dict` of a saved one).
        path: the PNG to write.
        min_agreement: the agreement budget (export's --min-agreement, 0..1), drawn as a line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, key = candidate_points(report)
    shapes = report.targets or sorted({s for p in points for s in p.timings_ms})
    lines, handles = key_lines(key), legend_handles(report, min_agreement)
    legend_in, key_in = 0.24 * math.ceil(len(handles) / 3) + 0.2, 0.14 * len(lines) + 0.2  # inches
    height = 6.0 + legend_in + key_in
    fig, axes = plt.subplots(1, max(len(shapes), 1), squeeze=False, figsize=(6.5 * max(len(shapes), 1), height))
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.7 / height, bottom=(0.65 + legend_in + key_in) / height,
                        wspace=0.2)
    for ax, shape in zip(axes[0], shapes, strict=False):
        draw_panel(ax, shape, points, report, min_agreement)
    fig.suptitle(f"bertedge export ({report.task}): answers equal to PyTorch's against p50 time, "
                 f"{len(points)} candidates", fontsize=12)
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, (legend_in + key_in) / height))
    fig.text(0.08, 0.15 / height, "\n".join(lines), fontsize=8, family="monospace", va="bottom")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def candidate_points(report: ExportReport) -> tuple[list[Point], list[str]]:
    """Every validated candidate with timings, and the key that names the recipes c1, c2..."""
    artifacts = [a for a in report.artifacts if a.validated and a.timings_ms]
    kept = kept_recipes(report.int8_search, artifacts)
    points, key = [], []
    for n, r in enumerate(report.int8_search, start=1):
        engine = str(r.recipe.get("engine", ONNXRUNTIME))
        verdict = ("could not be built: " + (r.error or "")[:60]) if r.agreement is None else (
            ("passed" if r.passed else "failed") + (f", kept as {kept[n].name}" if n in kept else ""))
        key.append(f"c{n}  {r.candidate} ({engine}; {verdict})")
        if r.agreement is not None and r.timings_ms and n not in kept:
            points.append(Point(f"c{n}", engine, r.passed, False, r.agreement, dict(r.timings_ms), recipe=True))
    number = {a.name: n for n, a in kept.items()}
    for a in artifacts:
        label = a.name + (" (measured)" if a.cascade is not None else "") + (f" = c{number[a.name]}"
                                                                            if a.name in number else "")
        points.append(Point(label, a.engine, a.passed, a.name == report.recommended, a.label_agreement,
                            dict(a.timings_ms)))
    return points, key


def kept_recipes(rows: list[CandidateRow], artifacts: list[ArtifactReport]) -> dict[int, ArtifactReport]:
    """Recipe number (c1 is 1) -> the artifact its ladder kept it as, at most one each way."""
    kept: dict[int, ArtifactReport] = {}
    for a in artifacts:
        n = next((n for n, r in enumerate(rows, start=1) if n not in kept and same_recipe(a, r)), None)
        if n is not None:
            kept[n] = a
    return kept


def same_recipe(a: ArtifactReport, r: CandidateRow) -> bool:
    """Whether the artifact is that recipe's result as its ladder kept it (the same recipe and
    agreement; its timings may differ: the finalists are timed again)."""
    return a.quantization is not None and r.recipe == a.quantization and r.agreement == a.label_agreement


def key_lines(key: list[str], width: int = 150) -> list[str]:
    """The recipes' key, each wrapped to `width` characters."""
    return [line for entry in key for line in textwrap.wrap(entry, width, subsequent_indent="     ")]


def draw_panel(ax: Any, shape: str, points: list[Point], report: ExportReport, min_agreement: float) -> None:
    """One target shape: the budget, the cascade curves, the candidates and their labels."""
    ax.axhline(min_agreement * 100, color="tab:red", linestyle="--", linewidth=1)
    avoid = []
    for a in report.artifacts:
        avoid += draw_curve(ax, a, shape)
    here = [p for p in points if shape in p.timings_ms]
    for p in here:
        draw_point(ax, p, shape)
    set_limits(ax, shape, here, avoid, min_agreement)
    batch, seq = shape.split("x")
    ax.set(title=f"batch {batch} x {seq} tokens", xlabel=f"p50 ms at {shape} (log scale)",
           ylabel="answers equal to PyTorch's (%; the scale stretches toward 100)")
    ax.grid(alpha=0.3, which="both")
    place_labels(ax, [(p.timings_ms[shape], p.agreement * 100, p.label) for p in here], avoid)


def draw_curve(ax: Any, a: ArtifactReport, shape: str) -> list[tuple[float, float]]:
    """A cascade's delta curve at `shape` (its estimated cost per delta), the chosen delta ringed;
    the curve's points (for the labels to avoid)."""
    if a.cascade is None:
        return []
    cal = a.cascade.calibration
    xy = [(p.cost_ms[shape], p.agreement * 100) for p in cal.curve if shape in p.cost_ms]
    if not xy:
        return []
    ax.plot(*zip(*xy, strict=True), color=COLORS[CASCADE], linewidth=1.5, alpha=0.8, zorder=2)
    chosen = [(p.cost_ms[shape], p.agreement * 100, p.escalated) for p in cal.curve
              if p.delta == cal.delta and shape in p.cost_ms]
    for x, y, share in chosen:
        ax.scatter([x], [y], s=140, facecolors="none", edgecolors=COLORS[CASCADE], linewidths=1.8, zorder=4)
        ax.annotate(f"delta {cal.delta:.3g}: {share:.1%} escalated", (x, y), xytext=(10, -22),
                    textcoords="offset points", fontsize=8, color="darkgreen",
                    arrowprops={"arrowstyle": "-", "color": "darkgreen", "linewidth": 0.6})
    return xy


def draw_point(ax: Any, p: Point, shape: str) -> None:
    """A candidate: filled when it passed, hollow when it failed, a star when recommended; the
    artifacts as circles, the ladders' other recipes as smaller squares."""
    color = COLORS.get(p.engine, "tab:gray")
    marker, size = ("*", 260) if p.recommended else (("s", 36) if p.recipe else ("o", 60))
    ax.scatter([p.timings_ms[shape]], [p.agreement * 100], marker=marker, s=size, linewidths=1.4, zorder=5,
               facecolors=color if p.passed else "white", edgecolors="black" if p.recommended else color)


def set_limits(ax: Any, shape: str, points: list[Point], curve: list[tuple[float, float]],
               min_agreement: float) -> None:
    """Log x with plain numbers; y on the nines scale (`nines`) from below the lowest point to 100 %."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ys = [p.agreement * 100 for p in points] + [y for _, y in curve] + [min_agreement * 100]
    xs = [x for x in [p.timings_ms[shape] for p in points] + [x for x, _ in curve] if x > 0]
    ax.set_xscale("log")
    if xs:
        ax.set_xlim(min(xs) / 1.2, max(xs) * 1.2)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("function", functions=(nines, from_nines))
    low = float(from_nines(nines(min(ys)) - 0.15))
    ax.set_ylim(low, float(from_nines(nines(100.0) + 0.35)))
    ticks = [t for t in (50, 80, 90, 95, 97, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.98, 100) if t >= low]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(FixedLocator([]))


def nines(percent: Any) -> Any:
    """The y scale: -log10 of the answers changed (% + 0.01), so 99, 99.9 and 100 sit apart;
    continued in a straight line above 100 for the margin.

    >>> [round(float(v), 3) for v in nines(np.array([99.0, 99.9, 100.0]))]
    [-0.004, 0.959, 2.0]
    """
    d = 100.0 - np.asarray(percent, dtype=float)
    return np.where(d >= 0, -np.log10(np.maximum(d, 0.0) + NINES_FLOOR),
                    -math.log10(NINES_FLOOR) - d / (NINES_FLOOR * math.log(10)))


def from_nines(t: Any) -> Any:
    """The inverse of `nines`.

    >>> [round(float(v), 6) for v in from_nines(nines(np.array([97.0, 99.95, 100.0, 100.001])))]
    [97.0, 99.95, 100.0, 100.001]
    """
    t = np.asarray(t, dtype=float)
    top = -math.log10(NINES_FLOOR)
    return np.where(t <= top, 100.0 - (10.0 ** -np.minimum(t, top) - NINES_FLOOR),
                    100.0 + (t - top) * NINES_FLOOR * math.log(10))


def place_labels(ax: Any, labelled: list[tuple[float, float, str]], avoid: list[tuple[float, float]]) -> None:
    """Label each point at the first spot around it (`LABEL_SPOTS`) that overlaps no other label,
    point or curve point and stays inside the axes; where none is free, at the first spot."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform(xy) for xy in [(x, y) for x, y, _ in labelled] + avoid]
    taken: list[Any] = []
    for x, y, text in sorted(labelled, key=lambda t: (t[0], -t[1])):
        best = None
        for dx, dy, ha, va in LABEL_SPOTS:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8,
                            zorder=6, arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.5}
                            if abs(dx) > 6 or abs(dy) > 8 else None)
            box = t.get_window_extent(renderer).expanded(1.04, 1.15)
            free = (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
                    and not any(box.overlaps(b) for b in taken)
                    and not any(box.contains(px, py) for px, py in dots))
            if free:
                best = (t, box)
                break
            t.remove()
        if best is None:
            t = ax.annotate(text, (x, y), xytext=LABEL_SPOTS[0][:2], textcoords="offset points", fontsize=8,
                            zorder=6)
            best = (t, t.get_window_extent(renderer))
        taken.append(best[1])


def legend_handles(report: ExportReport, min_agreement: float) -> list[Any]:
    """What the marks mean."""
    from matplotlib.lines import Line2D

    def mark(marker: str, face: str, edge: str, label: str, size: float = 8) -> Any:
        return Line2D([], [], linestyle="none", marker=marker, markersize=size, markerfacecolor=face,
                      markeredgecolor=edge, label=label)

    handles = [mark("o", "0.4", "0.4", "passed its budgets (filled)"), mark("o", "white", "0.4", "failed (hollow)"),
               mark("*", "0.4", "black", f"recommended: {report.recommended or 'none'}", 13),
               mark("o", COLORS[ONNXRUNTIME], COLORS[ONNXRUNTIME], "onnxruntime artifact"),
               mark("o", COLORS["openvino"], COLORS["openvino"], "OpenVINO artifact"),
               mark("s", "white", "0.4", "cN: an INT8 recipe tried (key below)", 6),
               Line2D([], [], color="tab:red", linestyle="--",
                      label=f"agreement budget: {min_agreement * 100:g} % (--min-agreement)")]
    if any(a.cascade is not None for a in report.artifacts):
        handles += [Line2D([], [], color=COLORS[CASCADE],
                           label="cascade at each delta: estimated, stage 1's ms + escalated share x later stage's"),
                    mark("o", COLORS[CASCADE], COLORS[CASCADE], "cascade measured on real texts"),
                    mark("o", "none", COLORS[CASCADE], "the chosen delta", 11)]
    return handles
