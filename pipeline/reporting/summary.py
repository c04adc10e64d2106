"""What a reader of any report needs first: what to ship, why, what to watch out for, and where it was measured.

The HTML report, the Markdown report and the model card all open with the same answer, so it is worked out
once, here, from report.json alone: the recommended model (``deployment``, chosen by the gates) with its
accuracy, latency, size, MACs and the gates it passes; the flags (variants slower than the fp32 student,
variants that disagree with it, distillation that does not beat training alone); the failed gates with
measured value and threshold; and the benchmark's context (CPU, threads, provider, onnxruntime version).
"""

from __future__ import annotations

from typing import Any

from kdpipe.reporting import datafree
from kdpipe.reporting.gates import PARITY, evaluate
from kdpipe.reporting.macs import format_macs

DISAGREEMENT = 0.99  # a variant agreeing with its fp32 student on fewer top-1 labels than this is flagged


def pct(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * float(value):.{digits}f}%"


def pp(value: Any) -> str:
    """A top-1 difference in percentage points (``-0.0022`` → ``-0.22 pp``)."""
    return "–" if value is None else f"{100 * float(value):+.2f} pp"


def batches(models: dict[str, Any]) -> list[int]:
    """Batch sizes benchmarked for any model, ascending (``batch_64`` → 64)."""
    found = set()
    for m in models.values():
        for key in (m.get("latency") or {}) if isinstance(m, dict) else ():
            if str(key).startswith("batch_") and str(key)[6:].isdigit():
                found.add(int(str(key)[6:]))
    return sorted(found)


def batch_of(key: str | None) -> str:
    return "?" if not key else str(key).removeprefix("batch_")


def benchmark_context(report: dict[str, Any]) -> str:
    """'AMD EPYC (2 cores), 1 intra-op thread, CPUExecutionProvider, onnxruntime 1.32.0, batch 1 and 64'."""
    bench = report.get("benchmark") or {}
    if not bench:
        return "no benchmark in this run"
    host = bench.get("host") or {}
    cpu = host.get("cpu") or host.get("machine") or "unknown CPU"
    cores = f" ({host['cpu_count']} cores)" if host.get("cpu_count") else ""
    threads = bench.get("intra_op_threads")
    parts = [f"{cpu}{cores}", f"{threads} intra-op thread{'s' if threads != 1 else ''}" if threads else None]
    parts.append(", ".join(bench.get("providers") or []) or None)
    parts.append(f"onnxruntime {host['onnxruntime']}" if host.get("onnxruntime") else None)
    batches = sorted({int(batch_of(b)) for m in (report.get("models") or {}).values() for b in m.get("latency") or {}})
    if batches:
        parts.append("batch " + " and ".join(str(b) for b in batches))
    return ", ".join(p for p in parts if p)


def failed_gates(report: dict[str, Any]) -> list[str]:
    """'student.top1 >= 0.88: measured 0.8512, threshold >= 0.88' for every failed gate, in order."""
    return [
        f"{g.get('name', '?')}: measured {g.get('measured', float('nan')):.6g}, threshold {g.get('op', '')} "
        f"{g.get('threshold', float('nan')):g}"
        for g in report.get("gates") or []
        if not g.get("passed")
    ]


def _gates_of(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The student's threshold gates judged for ``name`` (as the recommendation did), with measured values."""
    from kdpipe.config import GateConfig
    from kdpipe.errors import UsageError

    out = []
    for g in report.get("gates") or []:
        if g.get("model") != "student" or (name != "student" and g.get("metric") in PARITY):
            continue
        try:
            bound = {"min" if g["op"] == ">=" else "max": g["threshold"]}
            gate = GateConfig(metric=g["metric"], model=name, batch_size=g.get("batch_size"), **bound)
            (verdict,) = evaluate(report, [gate])
        except (UsageError, ValueError, KeyError, TypeError):  # a baseline comparison, a figure it lacks
            continue
        out.append({"name": g["name"].replace("student", name, 1), "measured": verdict["measured"],
                    "passed": verdict["passed"], **bound})  # fmt: skip
    return out


def recommendation(report: dict[str, Any]) -> dict[str, Any]:
    """``{"status", "model", "facts", "gates", "reason"}``: status is ship, none (nothing passes) or ungated."""
    models = report.get("models") or {}
    deployment = report.get("deployment") or {}
    name = deployment.get("recommended")
    if deployment and not name:
        return {"status": "none", "model": None, "facts": {}, "gates": [], "reason": "no student variant passes "
                "the student's gates", "candidates": deployment.get("candidates") or []}  # fmt: skip
    status = "ship" if name else "ungated"
    name = name or ("student" if "student" in models else None)
    if name is None:
        return {"status": "empty", "model": None, "facts": {}, "gates": [], "reason": "no student in this run"}
    m = models[name]
    acc, onnx, lat = m.get("accuracy") or {}, m.get("onnx") or {}, m.get("latency") or {}
    batch = next((c["batch"] for c in deployment.get("candidates") or [] if c["model"] == name), None)
    batch = batch or (min(lat, key=lambda b: int(batch_of(b))) if lat else None)
    cell = lat.get(batch) or {}
    student = models.get("student") or {}
    teacher = models.get("teacher") or {}
    facts = {
        "test_top1": acc.get("top1"),
        "top1_vs_fp32": None if name == "student" else _diff(acc.get("top1"), (student.get("accuracy") or {})),
        "top1_vs_teacher": _diff(acc.get("top1"), teacher.get("accuracy") or {}),
        "agreement_with_fp32": acc.get("agreement_with_fp32"),
        "batch": batch_of(batch) if batch else None,
        "p50_ms": cell.get("p50_ms"),
        "p90_ms": cell.get("p90_ms"),
        "speedup_vs_teacher": _ratio((teacher.get("latency") or {}).get(batch), cell),
        "file_bytes": onnx.get("file_bytes"),
        "file": onnx.get("file"),
        "parameters": m.get("parameters"),
        "macs": (m.get("macs") or {}).get("macs"),
    }
    reason = deployment.get("criterion") or "no gates were evaluated: the fp32 student, unjudged"
    return {"status": status, "model": name, "facts": facts, "gates": _gates_of(report, name), "reason": reason}


def _diff(top1: Any, other: dict[str, Any]) -> float | None:
    return None if top1 is None or other.get("top1") is None else float(top1) - float(other["top1"])


def _ratio(slow: dict[str, Any] | None, fast: dict[str, Any]) -> float | None:
    if not slow or not fast.get("p50_ms") or not slow.get("p50_ms"):
        return None
    return float(slow["p50_ms"]) / float(fast["p50_ms"])


def distillation_verdict(report: dict[str, Any]) -> str | None:
    """Whether the deployed method beat training the same student alone, in one honest sentence."""
    rows = [r for r in report.get("comparison") or [] if r.get("test_top1") is not None]
    deployed = next((r for r in rows if r.get("deployed")), None)
    scratch = next((r for r in rows if r.get("method") == "scratch"), None)
    if not deployed or not scratch or deployed is scratch:
        return None
    delta = 100 * (deployed["test_top1"] - scratch["test_top1"])
    best = max(rows, key=lambda r: r["test_top1"])
    head = f"{deployed['method']} {pct(deployed['test_top1'])} vs scratch {pct(scratch['test_top1'])} test top-1"
    if delta > 0:
        text = f"Distillation pays off here: {head} ({delta:+.2f} pp, same student, recipe and seed)."
    else:
        text = (
            f"Distillation does NOT beat training the student alone here: {head} ({delta:+.2f} pp, same student, "
            "recipe and seed); a stronger teacher or a longer recipe may change that (docs/methods.md)."
        )
    if best is not deployed:
        text += f" Best method in this run: {best['method']} ({pct(best['test_top1'])})."
    free = [r for r in rows if r.get("uses_teacher") is False and r is not scratch]  # e.g. zipf_ls
    if free and deployed.get("uses_teacher") is not False:
        top = max(free, key=lambda r: r["test_top1"])
        gap = 100 * (deployed["test_top1"] - top["test_top1"])
        text += f" Against the best teacher-free baseline, {top['method']} {pct(top['test_top1'])}: {gap:+.2f} pp."
    return text


def ensemble_line(report: dict[str, Any]) -> str | None:
    """Several teachers: each one's test top-1 and the ensemble's (the report's ``teacher``, what the student
    replaces), in one sentence; None for one teacher."""
    models = report.get("models") or {}
    teacher = models.get("teacher") or {}
    if not teacher.get("members"):
        return None
    each = []
    for name in teacher["members"]:
        m = models.get(name) or {}
        weight = f", weight {m['weight']:.2f}" if m.get("weight") is not None else ""
        each.append(f"{name} ({m.get('arch')}{weight}) {pct((m.get('accuracy') or {}).get('top1'))}")
    lat = teacher.get("latency") or {}
    batch = min(lat, key=lambda b: int(batch_of(b))) if lat else None
    speed = f", p50 {lat[batch]['p50_ms']:.3f} ms at batch {batch_of(batch)}" if batch else ""
    return (f"The teacher is an ensemble of {len(each)}: {', '.join(each)} test top-1; their averaged logits "
            f"(one ONNX graph) score {pct((teacher.get('accuracy') or {}).get('top1'))}{speed}.")  # fmt: skip


def flags(report: dict[str, Any]) -> list[str]:
    """Warnings a person deciding what to ship must see: each says what was measured."""
    models = report.get("models") or {}
    out = []
    for name, m in models.items():
        if m.get("slower_than_fp32"):
            at = ", ".join(batch_of(b) for b in m.get("slower_than_fp32_at") or []) or "?"
            out.append(f"{name} is slower than the fp32 student on this CPU (batch {at}): do not ship it here")
        agreement = (m.get("accuracy") or {}).get("agreement_with_fp32")
        if "variant" in m and agreement is not None and agreement < DISAGREEMENT:
            out.append(f"{name} agrees with the fp32 student on only {pct(agreement)} of the parity samples' labels")
    verdict = distillation_verdict(report)
    if verdict and "NOT" in verdict:
        out.append(verdict)
    collapse = datafree.flag(report)
    if collapse:
        out.append(collapse)
    return out


def ship_lines(report: dict[str, Any], rec: dict[str, Any] | None = None) -> list[str]:
    """The recommendation (``rec``, computed here when not given) as a few plain sentences (Markdown and the model
    card use them)."""
    rec = rec or recommendation(report)
    if rec["status"] == "none":
        return [f"**Nothing to ship**: {rec['reason']}."]
    if rec["status"] == "empty":
        return [f"Nothing to ship: {rec['reason']}."]
    f = rec["facts"]
    what = "Ship" if rec["status"] == "ship" else "No gates were evaluated; the fp32 student is"
    latency = "no latency"
    if f["p90_ms"] is not None:
        latency = f"p90 {f['p90_ms']:.3f} ms (p50 {f['p50_ms']:.3f} ms) at batch {f['batch']}"
    size = f"{f['file_bytes']:,} bytes" if f["file_bytes"] else "no ONNX file"
    line = (f"{what} **{rec['model']}**: test top-1 {pct(f['test_top1'])}, {latency}, {size}, "
            f"{format_macs(f['macs'])} MACs per image.")  # fmt: skip
    passed = [g["name"] for g in rec["gates"] if g["passed"]]
    lines = [line]
    if rec["status"] == "ship":
        lines.append(f"It passes the student's gates ({', '.join(passed) or 'none apply'}); chosen as the "
                     f"{rec['reason']}.")  # fmt: skip
    return lines
