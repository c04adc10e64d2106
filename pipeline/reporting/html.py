"""One self-contained HTML report: inline CSS, plots embedded as base64 PNG, no scripts, nothing fetched.

The page must open from an e-mail attachment or a CI artifact with no network, so nothing is linked:
every plot is a PNG drawn with matplotlib's Agg backend (``plots.py``) and inlined as a ``data:`` URI.
Its first screen answers "what do I ship?" (``summary.py``): the recommended model with its accuracy,
latency, size, MACs and gates, the flags, and where the latency was measured. Every section is optional;
a report without training, gates or latency renders with those parts left out.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from kdpipe.fileio import atomic_write_text
from kdpipe.reporting import datafree, plots, quantization, summary
from kdpipe.reporting.macs import format_macs
from kdpipe.reporting.summary import pp

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:20px auto;
max-width:1100px;padding:0 16px;color:#1f2328;font-size:14px;line-height:1.45}
h1{font-size:21px;margin:0 0 2px}h3{font-size:15px;margin:16px 0 6px}
h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#59636e;margin:0 0 10px}
.banner{padding:8px 14px;border-radius:6px;font-weight:600;margin:10px 0}
.pass{background:#dafbe1;border:1px solid #4ac26b;color:#116329}
.failb{background:#ffebe9;border:1px solid #ff8182;color:#a40e26}
.none{background:#f6f8fa;border:1px solid #d0d7de;color:#59636e}
.card{border-radius:8px;padding:12px 16px;margin:10px 0 6px}
.card.ship{border:2px solid #1a7f37;background:#f6fff8}.card.stop{border:2px solid #cf222e;background:#fff8f7}
.card.ungated{border:2px solid #9a6700;background:#fffdf3}
.card .head{font-size:18px;font-weight:700;margin-bottom:8px}
.facts{display:grid;grid-template-columns:repeat(5,minmax(0,1fr));gap:8px;margin:6px 0}
.fact{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:6px 9px}
.fact .v{font-size:18px;font-weight:650}.fact .k{color:#59636e;font-size:12px}
ul.gl{margin:6px 0;padding-left:18px}ul.gl li{margin:1px 0}
.ok{color:#116329}.bad{color:#a40e26}.warn{color:#9a6700}
.ctx{color:#59636e;font-size:13px;margin-top:6px}
.wrap{overflow-x:auto}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 7px;text-align:right;white-space:nowrap}
th{background:#f6f8fa}td.l,th.l{text-align:left}
tr.fail td{background:#ffebe9}tr.ok td.v{color:#116329;font-weight:600}tr.fail td.v{color:#a40e26;font-weight:600}
tr.rec td{background:#f0fff4}
td.detail{white-space:normal;text-align:left;max-width:420px}
figure{margin:14px 0}figure img{max-width:100%;border:1px solid #eaeef2}
.note{color:#59636e;font-size:13px}code{font-size:12px}
"""

SPLITS = ("train_images", "val_images", "test_images")
LATENCY_KEYS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    v = plots.num(value)
    return "–" if v is None else f"{v * scale:{spec}}{suffix}"


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


def _fact(value: str, key: str) -> str:
    return f'<div class="fact"><div class="v">{value}</div><div class="k">{key}</div></div>'


def _ship_card(report: dict[str, Any], rec: dict[str, Any]) -> str:
    """The first screen: what to ship (or that nothing passes), its figures and gates, the flags, the context."""
    parts: list[str] = []
    if rec["status"] in ("none", "empty"):
        parts.append(f'<div class="head bad">Nothing to ship: {_e(rec["reason"])}.</div>')
        failed = [f"<li>✗ {_e(line)}</li>" for line in summary.failed_gates(report)]
        if failed:
            parts.append(f'<div>Failed gates:</div><ul class="gl bad">{"".join(failed)}</ul>')
        others = [
            f"{_e(c['model'])} ({len(c.get('failed') or [])} failed)"
            for c in rec.get("candidates") or []
            if c["model"] != "student" and c.get("failed")
        ]
        if others:
            parts.append(f'<div class="note">Variants judged by the student\'s gates: {", ".join(others)}.</div>')
        cls = "stop"
    else:
        f = rec["facts"]
        head = "Ship" if rec["status"] == "ship" else "No gates evaluated; the fp32 student"
        file = f" <code>{_e(f['file'])}</code>" if f.get("file") else ""
        parts.append(f'<div class="head">{head}: <span class="ok">{_e(rec["model"])}</span>{file}</div>')
        lat_key = f"p90 latency, batch {f['batch']} (p50 {_fmt(f['p50_ms'], '.3f')} ms)"
        speed = f"{_fmt(f['speedup_vs_teacher'], '.2f')}× the teacher's speed (p50)" if f["speedup_vs_teacher"] else ""
        top1_key = "test top-1" + (f", {pp(f['top1_vs_fp32'])} vs fp32" if f["top1_vs_fp32"] is not None else "")
        top1_key += f", {pp(f['top1_vs_teacher'])} vs teacher" if f["top1_vs_teacher"] is not None else ""
        facts = [
            _fact(_fmt(f["test_top1"], ".2f", 100, "%"), _e(top1_key)),
            _fact(_fmt(f["p90_ms"], ".3f", suffix=" ms"), _e(lat_key + (f"; {speed}" if speed else ""))),
            _fact(_fmt(f["file_bytes"], ",.0f"), "ONNX bytes"),
            _fact(_e(format_macs(f["macs"])), "MACs per image (ONNX graph)"),
            _fact(_fmt(f["parameters"], ",.0f"), "parameters"),
        ]
        parts.append(f'<div class="facts">{"".join(facts)}</div>')
        gates = [
            f'<li class="{"ok" if g["passed"] else "bad"}">{"✓" if g["passed"] else "✗"} {_e(g["name"])}: measured '
            f"{g['measured']:.6g} ({'≥' if 'min' in g else '≤'} {g.get('min', g.get('max')):g})</li>"
            for g in rec["gates"]
        ]
        if gates:
            parts.append(f'<div>Gates of the student, judged on this model:</div><ul class="gl">{"".join(gates)}</ul>')
        parts.append(f'<div class="note">Chosen as the {_e(rec["reason"])}.</div>')
        cls = "ship" if rec["status"] == "ship" else "ungated"
    flags = summary.flags(report)
    if flags:
        parts.append('<ul class="gl">' + "".join(f'<li class="warn">⚠ {_e(x)}</li>' for x in flags) + "</ul>")
    verdict = summary.distillation_verdict(report)
    if verdict and verdict not in flags:
        parts.append(f"<div>{_e(verdict)}</div>")
    parts.append(f'<div class="ctx">Latency measured on: {_e(summary.benchmark_context(report))}.</div>')
    targets = report.get("targets") or {}
    if targets:
        parts.append(f'<div class="ctx">Also measured on: {_e(", ".join(targets))} (see "Other targets").</div>')
    return f'<div class="card {cls}">{"".join(p for p in parts if p)}</div>'


def _models_tables(models: dict[str, Any], batches: list[int], recommended: str | None) -> str:
    """Accuracy and size per model, then latency per model and batch size: one wide table would not fit a page."""
    head = ["model", "arch", "params", "MACs", "ONNX bytes", "test top-1", "top-5", "agree teacher", "agree fp32"]
    head += ["parity |Δ|"]
    rows, lat_rows = [], []
    for name, m in models.items():
        acc, onnx = m.get("accuracy") or {}, m.get("onnx") or {}
        flag = ' <span class="warn">⚠ slower</span>' if m.get("slower_than_fp32") else ""
        cells = [f"<b>{_e(name)}</b>{flag}", _e(m.get("arch", "–")), _fmt(m.get("parameters"), ",.0f")]
        cells += [_e(format_macs((m.get("macs") or {}).get("macs"))), _fmt(onnx.get("file_bytes"), ",.0f")]
        cells += [_fmt(acc.get(k), ".2f", 100, "%") for k in ("top1", "top5", "agreement_with_teacher")]
        cells += [_fmt(acc.get("agreement_with_fp32"), ".2f", 100, "%")]
        cls = "rec" if name == recommended else ""
        rows.append(_row([*cells, _fmt((onnx.get("parity") or {}).get("max_abs_diff"), ".1e")], cls, left=2))
        for b in batches:
            lat = (m.get("latency") or {}).get(f"batch_{b}")
            if lat:
                cells = [f"<b>{_e(name)}</b>", str(b), *(_fmt(lat.get(k), ".3f") for k in LATENCY_KEYS)]
                lat_rows.append(_row([*cells, _fmt(lat.get("throughput_ips"), ",.0f")], cls))
    html_ = _table(head, rows, left=2)
    html_ += (
        '<p class="note">⚠ slower: slower than the fp32 student at some batch size. Agreement: the share of test '
        "images on which the model predicts the teacher's label; for "
        "variants, the share of the export's parity samples on which it predicts the fp32 student's label. MACs: "
        "multiply-accumulates per image counted from the ONNX graph (convolutions and matrix products).</p>"
    )
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


def _methods_section(comparison: list[dict[str, Any]]) -> str:
    head = ["method", "student test top-1", "Δ vs scratch", "val top-1 (selection)", "deployed params", "time"]
    rows = []
    for r in comparison:
        name = f"<b>{_e(r.get('method'))}</b> (deployed)" if r.get("deployed") else _e(r.get("method"))
        delta = r.get("delta_vs_scratch")
        cells = [
            name,
            _fmt(r.get("test_top1"), ".2f", 100, "%"),
            pp(delta),
            _fmt(r.get("val_top1"), ".2f", 100, "%"),
        ]
        rows.append(_row([*cells, _fmt(r.get("parameters"), ",.0f"), _fmt(r.get("seconds"), ".1f", suffix=" s")]))
    note = (
        '<p class="note">Same student, recipe, seed and batches for every method; the epoch is chosen on the '
        "validation split, top-1 is on the test split.</p>"
    )
    return "<h2>Distillation methods</h2>" + _table(head, rows) + note


def _training_data_section(report: dict[str, Any]) -> str:
    """A data-free student: that it never saw a training image, the generator's terms, and its images per class."""
    text = datafree.lines(report)
    if not text:
        return ""
    items = "".join(f'<li class="warn">{_e(x)}</li>' if x.startswith("⚠") else f"<li>{_e(x)}</li>" for x in text)
    fig = datafree.grid_figure(report)
    grid = plots.img(fig, "Generated images per class") if fig is not None else ""
    return f'<h2>Training data: synthetic</h2><ul class="gl">{items}</ul>{grid}'


def _simkd_cost(student: dict[str, Any]) -> str:
    """A SimKD student is body + projector + the teacher's reused head: what the last two cost, on their own."""
    parts = student.get("parameters_breakdown") or {}
    if student.get("method") != "simkd" or not parts.get("projector"):
        return ""
    macs = (student.get("macs") or {}).get("per_part") or {}
    total_p, total_m = parts.get("total") or sum(v for k, v in parts.items() if k != "total"), sum(macs.values())
    rows = []
    for part, what in (("body", "student backbone"), ("projector", "SimKD projector"), ("head", "teacher's head")):
        p, m = parts.get(part), macs.get(part)
        share_p = _fmt(p / total_p if p is not None and total_p else None, ".1f", 100, "%")
        share_m = _fmt(m / total_m if m is not None and total_m else None, ".1f", 100, "%")
        rows.append(_row([_e(part), _e(what), _fmt(p, ",.0f"), share_p, _e(format_macs(m)), share_m], left=2))
    extra_p = (parts.get("projector") or 0) + (parts.get("head") or 0)
    note = (
        f'<p class="note">The projector and the reused teacher head add {extra_p:,} parameters to the '
        f"{_fmt(parts.get('body'), ',.0f')}-parameter backbone; they are part of the deployed model and of every "
        "figure above. MACs per part come from the ONNX graph's module scopes.</p>"
    )
    head = ["part", "what", "parameters", "share", "MACs", "share"]
    return "<h2>SimKD: what the projector and the reused head cost</h2>" + _table(head, rows, left=2) + note


def _targets_section(targets: dict[str, Any]) -> str:
    rows = []
    for name, t in targets.items():
        host = t.get("host") or {}
        where = f"{host.get('cpu') or host.get('machine', '?')}, ORT {host.get('onnxruntime', '?')}"
        for cell in t.get("results") or []:
            cells = [_e(name), _e(where), _e(cell.get("model")), _e(cell.get("provider")), _e(cell.get("threads"))]
            cells += [_e(cell.get("batch_size")), _fmt(cell.get("p50_ms"), ".3f"), _fmt(cell.get("p90_ms"), ".3f")]
            rows.append(_row(cells, left=4))
    head = ["target", "host", "model", "provider", "threads", "batch", "p50 ms", "p90 ms"]
    return "<h2>Other targets (kdpipe bench)</h2>" + _table(head, rows, left=4) if rows else ""


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document that needs no network and no JavaScript."""
    import matplotlib

    matplotlib.use("Agg")
    models = {str(k): v for k, v in (report.get("models") or {}).items() if isinstance(v, dict)}
    dataset = report.get("dataset") or {}
    classes = list(dataset.get("classes") or [])
    batches = summary.batches(models)
    title = f"kdpipe report: {dataset.get('name', 'unknown dataset')}"
    parts = [f"<h1>{_e(title)}</h1>"]
    meta = [f"created {report.get('created', '?')}", f"kdpipe {report.get('kdpipe_version', '?')}"]
    if dataset:
        shape = "×".join(str(s) for s in dataset.get("input_shape") or []) or "?"
        sizes = [f"{_fmt(dataset[k], ',.0f')} {k[:-7]}" for k in SPLITS if k in dataset]
        meta += [f"{len(classes)} classes, input {shape}", " / ".join(sizes)]
    parts.append(f'<p class="meta">{_e(" · ".join(m for m in meta if m))}</p>')
    recommended = (report.get("deployment") or {}).get("recommended")
    rec = summary.recommendation(report) if models else None
    if rec:
        parts.append(_ship_card(report, rec))
    banner, gates_html = _gates_section(list(report.get("gates") or []))
    parts += [banner, gates_html]
    if models:
        parts += ["<h2>Models</h2>", _models_tables(models, batches, recommended)]
        ensemble = summary.ensemble_line(report)
        parts.append(f'<p class="note">{_e(ensemble)}</p>' if ensemble else "")
    parts.append(_training_data_section(report))
    parts.append(quantization.render_html(report))
    comparison = [r for r in report.get("comparison") or [] if isinstance(r, dict)]
    if comparison:
        parts.append(_methods_section(comparison))
    parts.append(_simkd_cost(models.get("student") or {}))
    parts.append(_targets_section(report.get("targets") or {}))
    rec_batch = rec["facts"].get("batch") if rec else None
    batch = int(rec_batch) if rec_batch and str(rec_batch).isdigit() else (batches[0] if batches else None)
    student_method = (models.get("student") or {}).get("method") or ""
    drawings = [
        ("Accuracy vs latency", lambda: plots.pareto(models, batch, "p90_ms", recommended) if batch else None),
        ("Distillation methods", lambda: plots.methods(comparison) if comparison else None),
        ("Latency distributions", lambda: plots.latency(models, batches)),
        ("Training curves", lambda: plots.training(report.get("training") or {}, {"distill": student_method})),
        ("Confusion matrix", lambda: plots.confusion(models, classes)),
    ]
    figures, missing = [], []
    for name, draw in drawings:
        fig = draw()
        if fig is None:
            missing.append(name.lower())
        else:
            figures.append(plots.img(fig, name))
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
