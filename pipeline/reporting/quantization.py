"""The quantisation section of the Markdown and HTML reports: what each variant computes in, what int8 cost, which
nodes were to blame (sensitivity), what keeping them in fp32 bought (the fallback steps) and how QAD trained.

Everything is read from ``report.json``: ``models.<name>.quantization`` (``sensitivity``, ``fallback``, ``qad``)
and ``models.<name>.precision`` (the precision ORT computes the model in on the measured provider).
"""

from __future__ import annotations

import html
from typing import Any

from kdpipe.reporting.summary import pct, pp

TOP_NODES = 12  # sensitivity rows shown; report.json has them all


def _db(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _ms(cell: dict[str, Any] | None) -> str:
    return f"{cell['p50_ms']:.3f} / {cell['p90_ms']:.3f}" if cell and "p50_ms" in cell else "–"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """fp32 student and each variant: precision computed in, test top-1, Δ vs fp32, batch-1 p50/p90."""
    models = report.get("models", {})
    fp32 = (models.get("student", {}).get("accuracy") or {}).get("top1")
    rows = []
    for name, m in models.items():
        if name != "student" and "variant" not in m:
            continue
        top1 = (m.get("accuracy") or {}).get("top1")
        computes = (m.get("precision") or {}).get("computes_in", "fp32" if name == "student" else "–")
        delta = None if top1 is None or fp32 is None or name == "student" else top1 - fp32
        rows.append([name, computes, pct(top1), pp(delta), _ms((m.get("latency") or {}).get("batch_1"))])
    return rows


def _quantized(report: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    return [(n, m["quantization"][key]) for n, m in report.get("models", {}).items()
            if isinstance(m.get("quantization"), dict) and key in m["quantization"]]  # fmt: skip


def sensitivity_rows(table: dict[str, Any], limit: int = TOP_NODES) -> list[list[str]]:
    rows = []
    for r in table["nodes"][:limit]:
        alone, kept = r["quantized_only"], r["fp32_only"]
        rows.append([str(r["rank"]), r["node"], r["op_type"], _db(alone["sqnr_db"]), pct(alone["top1"]),
                     pct(kept["top1"]), _db(kept["sqnr_db"])])  # fmt: skip
    return rows


def fallback_rows(search: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in search["steps"]:
        mark = " ✔" if s["step"] == search["chosen"] else ""
        added = " + ".join(s.get("added") or s["excluded"][-1:]) or "(plain int8)"
        rows.append([f"{s['step']}{mark}", added, pct(s["val_top1"]), pp(s["val_top1"] - search["fp32_top1"]),
                     _db(s["sqnr_db"]), _ms(s)])  # fmt: skip
    return rows


SUMMARY_HEAD = ["model", "computes in", "test top-1", "Δ vs fp32", "p50 / p90 ms (b=1)"]
SENS_HEAD = ["rank", "node", "op", "SQNR alone int8 (dB)", "val top-1 alone int8", "val top-1 alone fp32",
             "SQNR alone fp32 (dB)"]  # fmt: skip
FALLBACK_HEAD = ["step", "nodes added to fp32", "val top-1", "Δ vs fp32", "SQNR (dB)", "p50 / p90 ms (b=1)"]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(report: dict[str, Any]) -> list[str]:
    """Markdown lines of the quantisation section ([] when the run made no quantised variant)."""
    models = report.get("models", {})
    if not any("variant" in m for m in models.values()):
        return []
    lines = ["", "### Quantisation", "", *_md_table(SUMMARY_HEAD, summary_rows(report))]
    for name, table in _quantized(report, "sensitivity"):
        lines += ["", f"Int8 sensitivity of {name} on {table['samples']} validation images (fp32 "
                  f"{pct(table['fp32']['top1'])}, all int8 {pct(table['int8']['top1'])}); most sensitive first:",
                  "", *_md_table(SENS_HEAD, sensitivity_rows(table))]  # fmt: skip
    for name, search in _quantized(report, "fallback"):
        state = "within" if search["within_budget"] else "NOT within"
        lines += ["", f"{name}: nodes left in fp32 a step at a time (greedy, alone or as a block with their "
                  f"neighbours), budget {pp(-search['budget'])} of val top-1; "
                  f"step {search['chosen']} chosen ({state} budget):", "", *_md_table(FALLBACK_HEAD,
                  fallback_rows(search))]  # fmt: skip
    for name, qad in _quantized(report, "qad"):
        parity = qad.get("fake_quant_parity") or {}
        dead = qad.get("dead_channels") or {}
        if dead:
            lines += ["", f"{name}: {sum(dead.values())} dead channel(s) (constant output, BN variance ~0) zeroed "
                      f"before folding in {', '.join(f'`{k}` ({v})' for k, v in dead.items())}."]  # fmt: skip
        lines += ["", f"{name}: QAD fine-tuned {qad['epochs']} epoch(s) with the {qad['method']} loss; best val "
                  f"top-1 (fake-quantised) {pct(qad['best_val_top1'])} at epoch {qad['best_epoch']}; ORT int8 vs the "
                  f"fake-quant PyTorch model: top-1 agreement {parity.get('top1_agreement', 0):.4f}, max abs Δ "
                  f"{parity.get('max_abs_diff', 0):.2e}."]  # fmt: skip
    return lines


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    """The same section as HTML (a ``<section>``; empty string when there is nothing to show)."""
    lines = render_markdown(report)
    if not lines:
        return ""
    parts = ["<section id='quantisation'><h2>Quantisation</h2>", _html_table(SUMMARY_HEAD, summary_rows(report))]
    for name, table in _quantized(report, "sensitivity"):
        parts.append(f"<h3>Int8 sensitivity: {html.escape(name)}</h3><p>{table['samples']} validation images; fp32 "
                     f"{pct(table['fp32']['top1'])}, all int8 {pct(table['int8']['top1'])}.</p>")  # fmt: skip
        parts.append(_html_table(SENS_HEAD, sensitivity_rows(table, limit=len(table["nodes"]))))
    for name, search in _quantized(report, "fallback"):
        parts.append(f"<h3>Fallback steps: {html.escape(name)}</h3><p>Budget {pp(-search['budget'])} of val top-1; "
                     f"step {search['chosen']} chosen.</p>")  # fmt: skip
        parts.append(_html_table(FALLBACK_HEAD, fallback_rows(search)))
    for name, qad in _quantized(report, "qad"):
        dead = qad.get("dead_channels") or {}
        settled = f" {sum(dead.values())} dead channel(s) zeroed before folding." if dead else ""
        parts.append(f"<p>{html.escape(name)}: QAD {qad['epochs']} epoch(s), {html.escape(qad['method'])} loss, best "
                     f"val top-1 {pct(qad['best_val_top1'])}.{html.escape(settled)}</p>")  # fmt: skip
    return "".join(parts) + "</section>"
