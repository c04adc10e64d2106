"""The HTML report's figures: matplotlib (Agg) figures, each inlined as a base64 PNG by :func:`img`.

Every function takes report data and returns a figure, or None when the report has nothing to draw.
Figures are built to be read at a glance: every point of a scatter is tied to its own label by a
leader line, model names go on the axis where they have room (horizontal boxes), and quantities of a
different kind (the teacher's cross-entropy, a SimKD student's feature MSE) never share an axis.
"""

from __future__ import annotations

import base64
import io
from typing import Any

MARKERS = (("p50_ms", "o", "#0969da"), ("p90_ms", "^", "#bf8700"), ("p99_ms", "v", "#cf222e"))
HORIZONTAL = {"orientation": "horizontal"}  # matplotlib >= 3.10; older ones want vert=False


def _horizontal() -> None:
    import matplotlib

    if tuple(int(p) for p in matplotlib.__version__.split(".")[:2]) < (3, 10):
        HORIZONTAL.clear()
        HORIZONTAL["vert"] = False


LOSS_NAMES = {
    "simkd": "feature MSE",
    "kd": "CE + T²·KL",
    "fitnet": "CE + β·hint MSE",
    "scratch": "cross-entropy",
    "crd": "CE + β·NCE",
    "crd_kd": "CE + β·NCE + T²·KL",
    "dkd": "CE + T²(α·TCKD + β·NCKD)",
    "zipf_ls": "CE + λ·KL(Zipf ‖ own)",
}


def num(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def img(fig: Any, alt: str) -> str:
    """The figure as an inline ``<img>``; the figure is closed here so no caller can leak it."""
    import html

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def label_points(fig: Any, ax: Any, pts: list[tuple[float, float, str]]) -> None:
    """Name each point with a label joined to it by a leader line, placed where it covers no marker or label."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # final limits and scales: the transforms below are the ones that get drawn
    renderer = fig.canvas.get_renderer()
    centres = [ax.transData.transform((x, y)) for x, y, _ in pts]
    placed: list[Any] = [Bbox.from_bounds(cx - 6, cy - 6, 12, 12) for cx, cy in centres]
    around = ((1, 0.5), (1, -1), (-1, 0.5), (-1, -1), (0, 1), (0, -1))  # right, below right, left, ..., above, below
    spots = [(r * dx, r * dy) for r in (14, 26, 40) for dx, dy in around]
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], -pts[i][1]))
    for i in order:
        x, y, name = pts[i]
        text = None
        for dx, dy in spots:
            if text is not None:
                text.remove()
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8.5, ha=ha,
                               va="center", arrowprops={"arrowstyle": "-", "color": "#8c959f", "lw": 0.8,
                                                        "shrinkA": 0, "shrinkB": 4})  # fmt: skip
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer)  # the words only: an Annotation's own extent has the line
            inside = ax.bbox.contains(box.x0, box.y0) and ax.bbox.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in placed):
                break
        placed.append(Text.get_window_extent(text, renderer))


def pareto(models: dict[str, Any], batch: int, key: str, recommended: str | None) -> Any | None:
    """Test top-1 against latency (``key``, e.g. p90_ms, at ``batch``: the recommendation's own criterion)."""
    import matplotlib.pyplot as plt

    pts = []
    for name, m in models.items():
        lat = num(((m.get("latency") or {}).get(f"batch_{batch}") or {}).get(key))
        top1 = num((m.get("accuracy") or {}).get("top1"))
        if lat is not None and top1 is not None and lat > 0:
            pts.append((lat, 100 * top1, str(name)))
    if not pts:
        return None
    pts.sort(key=lambda p: (p[0], -p[1]))
    front, best = [], float("-inf")
    for p in pts:  # fastest first: a point is on the front when it beats every faster model's accuracy
        if p[1] > best:
            front.append(p)
            best = p[1]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    others = [p for p in pts if p not in front]
    if others:
        ax.scatter([p[0] for p in others], [p[1] for p in others], s=36, color="#8c959f", zorder=3, label="model")
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=60, color="#0969da", zorder=4, label="Pareto front")
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls="--", color="#0969da", lw=1.2)
    chosen = [p for p in pts if p[2] == recommended]
    if chosen:
        ax.scatter([chosen[0][0]], [chosen[0][1]], s=260, marker="*", color="#1a7f37", zorder=5, label="recommended")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.3, y=0.25)
    if max(ys) - min(ys) < 0.5:  # a single model or a tie: keep a readable y range
        ax.set_ylim(min(ys) - 1, max(ys) + 1)
    percentile = key.removesuffix("_ms")
    ax.set_xlabel(f"{percentile} latency at batch {batch} (ms), the recommendation's criterion")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Accuracy vs {percentile} latency (batch {batch})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    label_points(fig, ax, pts)
    return fig


def log_ticks(low: float, high: float, width_px: float) -> list[float]:
    """Round values for a log axis from ``low`` to ``high`` (every digit, else 1-2-3-5, 1-2-5, 1-3, 1 per decade),
    the densest set whose labels (``f"{v:g}"``, ~6 px a character at 8 pt) do not touch on an axis ``width_px`` wide."""
    import math

    span = math.log10(high) - math.log10(low)
    ticks: list[float] = []
    for steps in ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 2, 5), (1, 3), (1,)):
        ticks = [
            float(f"{m * 10.0**e:.12g}")
            for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in steps
            if low <= m * 10.0**e <= high
        ]
        x = [(math.log10(t) - math.log10(low)) / span * width_px for t in ticks]
        half = [3 * len(f"{t:g}") + 5 for t in ticks]  # half a label's width plus a gap
        if all(x[i + 1] - x[i] >= half[i] + half[i + 1] for i in range(len(x) - 1)):
            return ticks
    return ticks


def latency(models: dict[str, Any], batches: list[int]) -> Any | None:
    """Per batch size, a horizontal box of per-round medians per model (names on the y axis: they never collide)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if not batches:
        return None
    _horizontal()
    names_all = [n for n, m in models.items() if m.get("latency")]
    height = max(2.6, 0.45 * len(names_all) + 1.4)
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 4.8 * len(batches)), height), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        names = [n for n in names_all if f"batch_{b}" in (models[n].get("latency") or {})][::-1]  # first on top
        for i, name in enumerate(names, start=1):
            lat = models[name]["latency"][f"batch_{b}"]
            rounds = [v for v in (num(r) for r in lat.get("round_p50_ms") or []) if v is not None]
            if rounds:
                ax.boxplot([rounds], positions=[i], widths=0.5, showfliers=True, patch_artist=True, **HORIZONTAL,
                           boxprops={"facecolor": "#ddf4ff", "edgecolor": "#0969da"},
                           medianprops={"color": "#0969da"})  # fmt: skip
            marks = [(k, m, c, num(lat.get(k))) for k, m, c in MARKERS if not rounds and num(lat.get(k)) is not None]
            for key, marker, colour, v in marks:
                ax.plot([v], [i], marker=marker, ms=7, color=colour, ls="none", label=key.replace("_ms", ""))
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=9)
        ax.set_ylim(0.4, len(names) + 0.6)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("latency (ms)")
        ax.grid(alpha=0.3, axis="x", which="both")
        ax.margins(x=0.08)
        low, high = ax.get_xlim()
        if low > 0 and high / low > 3:  # a fast and a slow model: log scale keeps both spreads visible
            ax.set_xscale("log")
            low, high = ax.get_xlim()
            ax.set_xticks(log_ticks(low, high, ax.get_window_extent().width))
            ax.set_xlim(low, high)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", which="both", labelsize=8)
        handles = {h.get_label(): h for h in ax.get_lines() if not h.get_label().startswith("_")}
        if handles:
            ax.legend(handles.values(), handles.keys(), fontsize=8, loc="lower right")
    fig.suptitle("Latency per measurement round (box: median of each round) or percentiles (markers)")
    fig.tight_layout()
    return fig


def training(training_: dict[str, Any], methods: dict[str, str]) -> Any | None:
    """One loss panel per model (its own loss, its own axis), then validation top-1 of all on one axis."""
    import matplotlib.pyplot as plt

    runs = {n: r.get("history") for n, r in training_.items() if isinstance(r, dict) and r.get("history")}
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4.2 * (len(runs) + 1), 3.6), squeeze=False)
    colours = ["#0969da", "#bf3989", "#1a7f37", "#bf8700"]
    acc_ax = axes[0][-1]
    for i, ((name, hist), ax) in enumerate(zip(runs.items(), axes[0], strict=False)):
        colour = colours[i % len(colours)]  # several teachers may make more runs than colours
        ep = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        loss = [num(h.get("train_loss")) for h in hist]
        acc = [num(h.get("val_top1")) for h in hist]
        ax.plot(ep, [float("nan") if v is None else v for v in loss], marker="o", color=colour)
        kind = LOSS_NAMES.get(methods.get(name, ""), "cross-entropy" if name == "teacher" else "loss")
        ax.set_title(f"{name}: training loss ({kind})", fontsize=10)
        ax.set_ylabel(kind)
        acc_ax.plot(ep, [float("nan") if v is None else 100 * v for v in acc], marker="o", color=colour, label=name)
    acc_ax.set_title("Validation top-1", fontsize=10)
    acc_ax.set_ylabel("val top-1 (%)")
    acc_ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def methods(comparison: list[Any]) -> Any | None:
    """Test top-1 per distillation method (same student, recipe and seed); the deployed one highlighted."""
    import matplotlib.pyplot as plt

    rows = [r for r in comparison if isinstance(r, dict) and num(r.get("test_top1")) is not None]
    if not rows:
        return None
    names = [str(r.get("method", "?")) for r in rows]
    values = [100 * float(r["test_top1"]) for r in rows]
    colours = ["#0969da" if r.get("deployed") else "#8c959f" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(rows) + 2), 3.6))
    bars = ax.bar(names, values, color=colours, width=0.6, zorder=3)
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=9)  # fmt: skip
    span = max(5.0, max(values) - min(values))  # zoom in on the differences, which are often a point or two
    bottom = max(0.0, min(values) - span)
    ax.set_ylim(bottom, min(100.0, max(values) + 0.2 * span) + 0.5)
    for label, r in zip(ax.get_xticklabels(), rows, strict=True):
        if r.get("deployed"):
            label.set_fontweight("bold")
    ax.set_ylabel("student test top-1 (%)")
    note = "; the axis does not start at 0" if bottom > 0 else ""
    ax.set_title(f"Distillation methods (same student, recipe, seed; deployed in blue{note})", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def confusion(models: dict[str, Any], classes: list[Any]) -> Any | None:
    import matplotlib.pyplot as plt
    import numpy as np

    name = "student" if "student" in models else next(iter(models), None)
    matrix = ((models.get(name) or {}).get("accuracy") or {}).get("confusion") if name else None
    if not matrix:
        return None
    counts = np.asarray(matrix, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        return None
    n = counts.shape[0]
    labels = [str(c) for c in classes] if len(classes) == n else [str(i) for i in range(n)]
    norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(8.0, max(4.5, 0.55 * n + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                colour = "white" if norm[i, j] > 0.6 else "#1f2328"
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {name} (row-normalised, counts shown)")
    return fig
