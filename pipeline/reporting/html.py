"""One self-contained HTML report: inline CSS, plots embedded as base64 PNG, no scripts, nothing fetched.

The page must open from an e-mail attachment or a CI artifact with no network, so nothing is linked:
every plot is a PNG drawn with matplotlib's Agg backend and inlined as a ``data:`` URI. Every section
is optional; a report without training, gates or latency renders with those parts left out.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from kdpipe.fileio import atomic_write_text
from kdpipe.reporting import quantization

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#1f2328;font-size:14px;line-height:1.45}
h1{font-size:22px;margin:0 0 4px}h3{font-size:15px;margin:16px 0 6px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#59636e;margin:0 0 14px}
.banner{padding:10px 14px;border-radius:6px;font-weight:600;margin:12px 0}
.pass{background:#dafbe1;border:1px solid #4ac26b;color:#116329}
.failb{background:#ffebe9;border:1px solid #ff8182;color:#a40e26}
.none{background:#f6f8fa;border:1px solid #d0d7de;color:#59636e}
.wrap{overflow-x:auto}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 7px;text-align:right;white-space:nowrap}
th{background:#f6f8fa}td.l,th.l{text-align:left}
tr.fail td{background:#ffebe9}tr.ok td.v{color:#116329;font-weight:600}tr.fail td.v{color:#a40e26;font-weight:600}
td.detail{white-space:normal;text-align:left;max-width:420px}
figure{margin:14px 0}figure img{max-width:100%;border:1px solid #eaeef2}
.note{color:#59636e;font-size:13px}code{font-size:12px}
"""

SPLITS = ("train_images", "val_images", "test_images")
LATENCY_KEYS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms")
MARKERS = (("p50_ms", "o", "#0969da"), ("p90_ms", "^", "#bf8700"), ("p99_ms", "v", "#cf222e"))


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    v = _num(value)
    return "–" if v is None else f"{v * scale:{spec}}{suffix}"


def _batches(models: dict[str, Any]) -> list[int]:
    """Batch sizes benchmarked for any model, ascending (``batch_64`` → 64)."""
    found = set()
    for m in models.values():
        for key in (m.get("latency") or {}) if isinstance(m, dict) else ():
            if str(key).startswith("batch_") and str(key)[6:].isdigit():
                found.add(int(str(key)[6:]))
    return sorted(found)


def _img(fig: Any, alt: str) -> str:
    """The figure as an inline ``<img>``; the figure is closed here so no caller can leak it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def _label_points(fig: Any, ax: Any, pts: list[tuple[float, float, str]]) -> None:
    """Name each point, moving a label round its point until it covers no marker and no earlier label."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    centres = [ax.transData.transform((x, y)) for x, y, _ in pts]
    placed: list[Any] = [Bbox.from_bounds(cx - 5, cy - 5, 10, 10) for cx, cy in centres]  # the markers themselves
    spots = [(7, 5, "left"), (7, -13, "left"), (-7, 5, "right"), (-7, -13, "right"), (7, 16, "left"), (7, -24, "left")]
    for x, y, name in pts:
        text = ax.annotate(name, (x, y), xytext=spots[0][:2], textcoords="offset points", fontsize=9)
        for dx, dy, ha in spots:
            text.set_position((dx, dy))
            text.set_horizontalalignment(ha)
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)


def _pareto(models: dict[str, Any], batches: list[int]) -> Any | None:
    import matplotlib.pyplot as plt

    if not batches:
        return None
    b = batches[0]
    pts = []
    for name, m in models.items():
        lat = _num(((m.get("latency") or {}).get(f"batch_{b}") or {}).get("p50_ms"))
        top1 = _num((m.get("accuracy") or {}).get("top1"))
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
    fig, ax = plt.subplots(figsize=(6, 4))
    others = "model" if len(front) < len(pts) else "_nolegend_"
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=36, color="#8c959f", zorder=3, label=others)
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=60, color="#0969da", zorder=4, label="Pareto front")
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls="--", color="#0969da", lw=1.2)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.2)
    if max(ys) - min(ys) < 0.5:  # a single model or a tie: keep a readable y range
        ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.set_xlabel(f"p50 latency at batch {b} (ms)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Accuracy vs latency (batch {b})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    _label_points(fig, ax, pts)
    return fig


def _latency(models: dict[str, Any], batches: list[int]) -> Any | None:
    """Per batch size, a box of per-round medians per model; p50/p90/p99 markers where rounds are absent."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if not batches:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 4.2 * len(batches)), 4), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        names = [n for n, m in models.items() if f"batch_{b}" in (m.get("latency") or {})]
        for i, name in enumerate(names, start=1):
            lat = models[name]["latency"][f"batch_{b}"]
            rounds = [v for v in (_num(r) for r in lat.get("round_p50_ms") or []) if v is not None]
            if rounds:
                ax.boxplot(
                    [rounds],
                    positions=[i],
                    widths=0.5,
                    showfliers=True,
                    patch_artist=True,
                    boxprops={"facecolor": "#ddf4ff", "edgecolor": "#0969da"},
                    medianprops={"color": "#0969da"},
                )
            marks = [(k, m, c, _num(lat.get(k))) for k, m, c in MARKERS if not rounds and _num(lat.get(k)) is not None]
            xs = [i + 0.12 * (j - (len(marks) - 1) / 2) for j in range(len(marks))]  # side by side, not stacked
            if len(marks) > 1:
                ax.plot(xs, [v for *_, v in marks], color="#8c959f", lw=1, zorder=1)
            for x, (key, marker, colour, v) in zip(xs, marks, strict=True):
                ax.plot([x], [v], marker=marker, ms=7, color=colour, ls="none", label=key.replace("_ms", ""))
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=9)
        ax.set_xlim(0.4, len(names) + 0.6)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("model")
        ax.set_ylabel("latency (ms)")
        ax.grid(alpha=0.3, axis="y", which="both")
        low, high = ax.get_ylim()
        if low > 0 and high / low > 3:  # a fast and a slow model: log scale keeps both spreads visible
            ax.set_yscale("log")
            for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_fmt(FuncFormatter(lambda v, _: f"{v:g}"))
        handles = {h.get_label(): h for h in ax.get_lines() if not h.get_label().startswith("_")}
        if handles:
            ax.legend(handles.values(), handles.keys(), fontsize=8, loc="upper right")
    fig.suptitle("Latency per measurement round (box) or percentiles (markers)")
    fig.tight_layout()
    return fig


def _training(training: dict[str, Any]) -> Any | None:
    import matplotlib.pyplot as plt

    runs = {n: r.get("history") for n, r in training.items() if isinstance(r, dict) and r.get("history")}
    if not runs:
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, hist in runs.items():
        ep = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        loss = [_num(h.get("train_loss")) for h in hist]
        acc = [_num(h.get("val_top1")) for h in hist]
        loss_ax.plot(ep, [float("nan") if v is None else v for v in loss], marker="o", label=str(name))
        acc_ax.plot(ep, [float("nan") if v is None else 100 * v for v in acc], marker="o", label=str(name))
    for ax, title, ylabel in ((loss_ax, "Training loss", "train loss"), (acc_ax, "Validation top-1", "val top-1 (%)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def _methods(comparison: list[Any]) -> Any | None:
    """Test top-1 per distillation method (same student, recipe and seed); the deployed one highlighted."""
    import matplotlib.pyplot as plt

    rows = [r for r in comparison if isinstance(r, dict) and _num(r.get("test_top1")) is not None]
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


def _confusion(models: dict[str, Any], classes: list[Any]) -> Any | None:
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


def _row(cells: list[str], cls: str = "", left: int = 1) -> str:
    """Pre-escaped cells → ``<tr>``; a cell that already starts with ``<td`` is kept as it is."""
    tds = "".join(
        c if c.startswith("<td") else f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
        for i, c in enumerate(cells)
    )
    return f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>"


def _table(head: list[str], rows: list[str], left: int = 1) -> str:
    th = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(head))
    return f'<div class="wrap"><table><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _models_tables(models: dict[str, Any], batches: list[int]) -> str:
    """Accuracy and size per model, then latency per model and batch size: one wide table would not fit a page."""
    head = ["model", "arch", "params", "ONNX bytes", "test top-1", "top-5", "agreement", "parity max |Δ|"]
    rows, lat_rows = [], []
    for name, m in models.items():
        acc, onnx = m.get("accuracy") or {}, m.get("onnx") or {}
        cells = [f"<b>{_e(name)}</b>", _e(m.get("arch", "–")), _fmt(m.get("parameters"), ",.0f")]
        cells += [_fmt(onnx.get("file_bytes"), ",.0f")]
        cells += [_fmt(acc.get(k), ".2f", 100, "%") for k in ("top1", "top5", "agreement_with_teacher")]
        rows.append(_row([*cells, _fmt((onnx.get("parity") or {}).get("max_abs_diff"), ".1e")], left=2))
        for b in batches:
            lat = (m.get("latency") or {}).get(f"batch_{b}")
            if lat:
                cells = [f"<b>{_e(name)}</b>", str(b), *(_fmt(lat.get(k), ".3f") for k in LATENCY_KEYS)]
                lat_rows.append(_row([*cells, _fmt(lat.get("throughput_ips"), ",.0f")]))
    html_ = _table(head, rows, left=2)
    if lat_rows:
        lat_head = ["model", "batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "std ms", "images/s"]
        html_ += "<h3>Latency</h3>" + _table(lat_head, lat_rows)
    return html_


def _gates_section(gates: list[dict[str, Any]]) -> tuple[str, str]:
    """(verdict banner, gates table); the table is empty when no gates ran."""
    if not gates:
        return '<div class="banner none">No gates configured: nothing was checked.</div>', ""
    failed = [g for g in gates if not g.get("passed")]
    banner = (
        f'<div class="banner failb">{len(failed)} of {len(gates)} gates failed.</div>'
        if failed
        else f'<div class="banner pass">All {len(gates)} gates pass.</div>'
    )
    rows = []
    for g in gates:
        ok = bool(g.get("passed"))
        threshold = f"{g.get('op', '')} {_fmt(g.get('threshold'), 'g')}".strip()
        verdict = f'<td class="v">{"PASS" if ok else "FAIL"}</td>'
        detail = f'<td class="detail">{_e(g.get("detail", ""))}</td>'
        cells = [_e(g.get("name", "?")), _fmt(g.get("measured"), ".6g"), _e(threshold), verdict, detail]
        rows.append(_row(cells, "ok" if ok else "fail"))
    return banner, "<h2>Gates</h2>" + _table(["gate", "measured", "threshold", "verdict", "detail"], rows)


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document that needs no network and no JavaScript."""
    import matplotlib

    matplotlib.use("Agg")
    models = {str(k): v for k, v in (report.get("models") or {}).items() if isinstance(v, dict)}
    dataset = report.get("dataset") or {}
    classes = list(dataset.get("classes") or [])
    batches = _batches(models)
    title = f"kdpipe report: {dataset.get('name', 'unknown dataset')}"
    parts = [f"<h1>{_e(title)}</h1>"]
    meta = [f"created {report.get('created', '?')}", f"kdpipe {report.get('kdpipe_version', '?')}"]
    if dataset:
        shape = "×".join(str(s) for s in dataset.get("input_shape") or []) or "?"
        sizes = [f"{_fmt(dataset[k], ',.0f')} {k[:-7]}" for k in SPLITS if k in dataset]
        meta += [f"{len(classes)} classes, input {shape}", " / ".join(sizes)]
    parts.append(f'<p class="meta">{_e(" · ".join(m for m in meta if m))}</p>')
    banner, gates_html = _gates_section(list(report.get("gates") or []))
    parts.append(banner)
    if models:
        parts += ["<h2>Models</h2>", _models_tables(models, batches)]
        speed = report.get("speedup_p50") or {}
        if speed:
            text = ", ".join(f"{_fmt(v, '.2f')}× at batch {str(k).removeprefix('batch_')}" for k, v in speed.items())
            parts.append(f'<p class="note">Student speed-up over the teacher (p50): {_e(text)}.</p>')
    parts.append(gates_html)
    parts.append(quantization.render_html(report))
    plots = [
        ("Accuracy vs latency", lambda: _pareto(models, batches)),
        ("Latency distributions", lambda: _latency(models, batches)),
        ("Training curves", lambda: _training(report.get("training") or {})),
        ("Confusion matrix", lambda: _confusion(models, classes)),
    ]
    if report.get("comparison"):
        plots.insert(1, ("Distillation methods", lambda: _methods(list(report["comparison"]))))
    figures, missing = [], []
    for name, draw in plots:
        fig = draw()
        if fig is None:
            missing.append(name.lower())
        else:
            figures.append(_img(fig, name))
    if figures:
        parts += ["<h2>Plots</h2>", *figures]
    if missing:
        parts.append(f'<p class="note">Not in this report (no data): {_e(", ".join(missing))}.</p>')
    stages = report.get("stages") or {}
    if stages:
        cached = {n: "cached" if st.get("cached") else "ran" for n, st in stages.items()}
        keys = {n: f"<code>{_e(str(st.get('key', ''))[:12])}</code>" for n, st in stages.items()}
        rows = [_row([_e(n), keys[n], cached[n], _fmt(st.get("seconds"), ".1f")], left=3) for n, st in stages.items()]
        parts += ["<h2>Stages</h2>", _table(["stage", "cache key", "cached / ran", "seconds"], rows, left=3)]
    versions = report.get("versions") or {}
    if versions:
        rows = [_row([_e(k), _e(v)], left=2) for k, v in versions.items()]
        parts += ["<h2>Versions</h2>", _table(["library", "version"], rows, left=2)]
    body = "\n".join(p for p in parts if p)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def write_html(report: dict[str, Any], path: Path) -> Path:
    """Render and write atomically, so a reader never sees a half-written page."""
    return atomic_write_text(Path(path), render_html(report))
