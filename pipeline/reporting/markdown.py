"""The Markdown report: a pull-request comment or a CI job summary that says what to ship, or why nothing can be.

It opens with the verdict and, on a failed run, every failed gate with its measured value and threshold
(so the comment alone says what to fix); then what to ship (``summary.py``, shared with the HTML report
and the model card), the flags, the comparison of distillation methods with its honest verdict, and the
models with accuracy, size, MACs and latency.
"""

from __future__ import annotations

from typing import Any

from kdpipe.reporting import datafree, quantization, summary
from kdpipe.reporting.macs import format_macs
from kdpipe.reporting.summary import pct


def models_table(models: dict[str, Any]) -> list[str]:
    """One row per model: accuracy, agreement, parity, size, MACs and p50/p90/p99 per batch size."""
    batches = [f"batch_{b}" for b in summary.batches(models)]
    head = ["model", "arch", "params", "MACs", "ONNX bytes", "test top-1", "top-5", "parity max abs Δ", "agreement"]
    head += [f"p50 / p90 / p99 ms (b={summary.batch_of(b)})" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in models.items():
        acc, onnx = m.get("accuracy") or {}, m.get("onnx") or {}
        parity = onnx.get("parity") or {}
        flag = " ⚠ slower than fp32" if m.get("slower_than_fp32") else ""
        agreement = acc.get("agreement_with_fp32", acc.get("agreement_with_teacher"))
        row = [
            name + flag,
            str(m.get("arch")),
            f"{m.get('parameters') or 0:,}",
            format_macs((m.get("macs") or {}).get("macs")),
            f"{onnx['file_bytes']:,}" if onnx.get("file_bytes") else "–",
            pct(acc.get("top1")),
            pct(acc.get("top5")),
            f"{parity['max_abs_diff']:.1e}" if "max_abs_diff" in parity else "–",
            pct(agreement),
        ]
        for b in batches:
            lat = (m.get("latency") or {}).get(b)
            row.append(f"{lat['p50_ms']:.3f} / {lat['p90_ms']:.3f} / {lat['p99_ms']:.3f}" if lat else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def comparison_table(comparison: list[dict[str, Any]]) -> list[str]:
    """``| method |`` rows: the deployed method in bold, Δ against the student trained alone."""
    lines = ["| method | student test top-1 | Δ vs scratch | val top-1 (selection) | time |", "|---|---|---|---|---|"]
    for row in comparison:
        name = f"**{row['method']}** (deployed)" if row.get("deployed") else row["method"]
        delta = row.get("delta_vs_scratch")
        delta_text = "–" if delta is None else f"{100 * delta:+.2f} pp"
        lines.append(f"| {name} | {pct(row.get('test_top1'))} | {delta_text} | {pct(row.get('val_top1'))} | "
                     f"{row.get('seconds') or 0:.1f} s |")  # fmt: skip
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """A compact summary fit for a pull-request comment."""
    gates = report.get("gates") or []
    failed = summary.failed_gates(report)
    verdict = (
        "no gates configured" if not gates
        else f"❌ {len(failed)} of {len(gates)} gates failed" if failed
        else f"✅ all {len(gates)} gates passed"
    )  # fmt: skip
    lines = ["## kdpipe report", "", f"**{verdict}**", ""]
    if failed:
        lines += ["Failed gates (measured vs threshold):", ""]
        lines += [f"- ❌ `{line.split(': measured')[0]}`: measured{line.split(': measured', 1)[1]}" for line in failed]
        lines.append("")
    models = report.get("models") or {}
    comparison = report.get("comparison") or []
    if models:
        lines += summary.ship_lines(report)
        verdict_text = summary.distillation_verdict(report)
        lines.append("")
        lines += [f"- ⚠ {flag}" for flag in summary.flags(report) if flag != verdict_text or not comparison]
        lines += ["", f"Latency measured on: {summary.benchmark_context(report)}.", ""]
    if datafree.synthetic(report):  # the collapse warning, if any, is one of the flags above
        lines += ["**Training data**: " + " ".join(x for x in datafree.lines(report) if not x.startswith("⚠")), ""]
    if comparison:
        lines += ["Distillation methods (same student, recipe and seed; epoch chosen on val, top-1 on test):", ""]
        lines += comparison_table(comparison)
        verdict_text = summary.distillation_verdict(report)
        lines += ["", verdict_text, ""] if verdict_text else [""]
    if models:
        lines += models_table(models)
        lines.append("")
        lines.append("MACs: multiply-accumulates per image, counted from the ONNX graph (convolutions and matrix "
                     "products; FLOPs ≈ 2 × MACs).")  # fmt: skip
        ensemble = summary.ensemble_line(report)
        if ensemble:
            lines.append(ensemble)
    student = models.get("student") or {}
    if "agreement_with_teacher" in (student.get("accuracy") or {}):
        lines.append(
            f"Student–teacher agreement on the test split: {pct(student['accuracy']['agreement_with_teacher'])}."
        )
    if report.get("speedup_p50"):
        sp = ", ".join(f"{v:.2f}× at batch {summary.batch_of(k)}" for k, v in report["speedup_p50"].items())
        lines.append(f"Student speed-up over the teacher (p50): {sp}.")
    lines += quantization.render_markdown(report)
    parts = [
        f"{n} " + ("cached" if s["cached"] else f"ran {s['seconds']:.1f}s")
        for n, s in (report.get("stages") or {}).items()
    ]
    if parts:
        lines += ["", "Stages: " + ", ".join(parts) + "."]
    return "\n".join(lines) + "\n"
