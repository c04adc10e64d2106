"""MODEL_CARD.md: what the shipped student is, how good, how fast where, how big, its limits and where it came from.

Written from report.json alone next to the report (and into every edge bundle), so the card always
matches the figures of the run it describes: the recommended model (or the fp32 student when no gates
ran), the data and the method, accuracy overall and per class, latency on the benchmark host and on every
``kdpipe bench --target`` machine, size and MACs, the limitations the run itself exposes, and the
provenance (stage cache keys, versions) needed to reproduce it.
"""

from __future__ import annotations

from typing import Any

from kdpipe.reporting import datafree, summary
from kdpipe.reporting.macs import format_macs
from kdpipe.reporting.summary import batch_of, pct

FILE = "MODEL_CARD.md"
METHODS = {
    "simkd": "SimKD: the student's feature map goes through a small projector into the teacher's own frozen "
    "classifier; trained with one MSE between projected student features and the teacher's features",
    "kd": "knowledge distillation (Hinton): cross-entropy with the labels plus KL to the teacher's softened logits",
    "fitnet": "FitNet hints: cross-entropy plus an MSE between regressed student features and the teacher's",
    "scratch": "trained alone with cross-entropy (no teacher)",
    "crd": "contrastive representation distillation: cross-entropy plus an NCE loss telling the teacher's "
    "embedding of the same image from those of other training images (kept in a memory)",
    "crd_kd": "CRD plus KD's soft term (KL to the teacher's softened logits)",
    "dkd": "decoupled KD: cross-entropy plus the target-class and non-target-class parts of KD's KL, weighted apart",
    "zipf_ls": "Zipf's label smoothing: cross-entropy plus a KL to a Zipf-shaped target over its own ranked "
    "non-target classes (no teacher)",
}


def _what(report: dict[str, Any], name: str) -> list[str]:
    models = report.get("models") or {}
    student, teacher, m = models.get("student") or {}, models.get("teacher") or {}, models.get(name) or {}
    data = report.get("dataset") or {}
    method = student.get("method") or "?"
    shape = "×".join(str(s) for s in data.get("input_shape") or []) or "?"
    lines = [
        f"- **Model**: `{name}`, a {m.get('arch') or student.get('arch')} student"
        + (f" ({m['variant']} variant of the fp32 student)" if m.get("variant") else " (fp32)")
        + f", ONNX file `{(m.get('onnx') or {}).get('file', '?')}` (opset {(m.get('onnx') or {}).get('opset', '?')}).",
        f"- **Input**: one {shape} image (NCHW, float32, normalised with the dataset's mean/std: see bundle.json); "
        f"**output**: {len(data.get('classes') or [])} logits, one per class.",
        f"- **Method**: {method}, {METHODS.get(method, method)}; teacher {teacher.get('arch', '?')} "
        f"({pct((teacher.get('accuracy') or {}).get('top1'))} test top-1).",
    ]
    parts = student.get("parameters_breakdown") or {}
    if method == "simkd" and parts.get("projector"):
        body, head, total = parts.get("body", 0), parts.get("head", 0), parts.get("total", 0)
        lines.append(
            f"- **Parts** (SimKD): backbone {body:,} + projector {parts['projector']:,} + the teacher's head "
            f"{head:,} = {total:,} parameters."
        )
    training = (report.get("training") or {}).get("distill") or {}
    if training.get("history"):
        best = f"{pct(training.get('best_val_top1'))}, epoch {training.get('best_epoch')}"
        lines.append(f"- **Training**: {len(training['history'])} epochs; the epoch with the best validation top-1 "
                     f"({best}) is kept.")  # fmt: skip
    return lines


def _data(report: dict[str, Any]) -> list[str]:
    data = report.get("dataset") or {}
    sizes = ", ".join(f"{data[k]:,} {k.removesuffix('_images')}" for k in ("train_images", "val_images", "test_images")
                      if k in data)  # fmt: skip
    classes = ", ".join(str(c) for c in data.get("classes") or [])
    return [
        f"- **Dataset**: {data.get('name', '?')} ({sizes}); classes: {classes}.",
        "- Validation images are held out of the training set and choose the epoch; the test split is used "
        "only for the figures below.",
        *(f"- **Training data**: {line}" for line in datafree.lines(report)[:1]),
        *(f"- {line}" for line in datafree.lines(report)[1:] if not line.startswith("⚠")),
    ]


def _accuracy(report: dict[str, Any], name: str) -> list[str]:
    models = report.get("models") or {}
    lines = ["| model | test top-1 | top-5 | agreement |", "|---|---|---|---|"]
    for n, m in models.items():
        acc = m.get("accuracy") or {}
        agreement = acc.get("agreement_with_fp32", acc.get("agreement_with_teacher"))
        what = "with fp32" if "agreement_with_fp32" in acc else "with teacher" if agreement is not None else ""
        bold = f"**{n}**" if n == name else n
        lines.append(f"| {bold} | {pct(acc.get('top1'))} | {pct(acc.get('top5'))} | {pct(agreement)} {what} |")
    per_class_of = name if (models.get(name, {}).get("accuracy") or {}).get("per_class_top1") else "student"
    per_class = ((models.get(per_class_of) or {}).get("accuracy") or {}).get("per_class_top1") or {}
    if per_class:
        note = "" if per_class_of == name else f" (the fp32 student's: {name}'s own per-class figures are not measured)"
        lines += ["", f"Per class, test top-1{note}:", "", "| class | top-1 |", "|---|---|"]
        lines += [f"| {c} | {pct(v)} |" for c, v in per_class.items()]
    return lines


def _latency(report: dict[str, Any]) -> list[str]:
    models = report.get("models") or {}
    lines = [f"On the benchmark host: {summary.benchmark_context(report)}.", ""]
    lines += ["| model | batch | p50 ms | p90 ms | p99 ms | images/s |", "|---|---|---|---|---|---|"]
    for n, m in models.items():
        for b, cell in sorted((m.get("latency") or {}).items(), key=lambda kv: int(batch_of(kv[0]))):
            p99, ips = cell.get("p99_ms", float("nan")), cell.get("throughput_ips", 0)
            lines.append(
                f"| {n} | {batch_of(b)} | {cell['p50_ms']:.3f} | {cell['p90_ms']:.3f} | {p99:.3f} | {ips:,.0f} |"
            )
    for key, target in (report.get("targets") or {}).items():
        host = target.get("host") or {}
        cpu = host.get("cpu") or host.get("machine") or "?"
        lines += ["", f"On target `{key}` ({target.get('target', '?')}: {cpu}, {host.get('cpu_count', '?')} cores, "
                      f"onnxruntime {host.get('onnxruntime', '?')}), measured by `kdpipe bench`:", ""]  # fmt: skip
        lines += ["| model | provider | threads | batch | p50 ms | p90 ms |", "|---|---|---|---|---|---|"]
        for c in target.get("results") or []:
            lines.append(f"| {c.get('model')} | {c.get('provider')} | {c.get('threads')} | {c.get('batch_size')} | "
                         f"{c.get('p50_ms', float('nan')):.3f} | {c.get('p90_ms', float('nan')):.3f} |")  # fmt: skip
    if not report.get("targets"):
        lines += ["", "No other target measured yet: `kdpipe bench --target ssh://user@host` adds one here."]
    return lines


def _size(report: dict[str, Any]) -> list[str]:
    lines = ["| model | parameters | ONNX bytes | MACs per image | FLOPs per image |", "|---|---|---|---|---|"]
    for n, m in (report.get("models") or {}).items():
        macs = (m.get("macs") or {}).get("macs")
        onnx = (m.get("onnx") or {}).get("file_bytes")
        lines.append(f"| {n} | {m.get('parameters') or 0:,} | {f'{onnx:,}' if onnx else '–'} | {format_macs(macs)} | "
                     f"{format_macs(2 * macs if macs else None)} |")  # fmt: skip
    lines += ["", "MACs are counted from each ONNX graph at batch 1 (convolutions and matrix products; element-wise "
                  "ops, pooling and normalisation left out)."]  # fmt: skip
    return lines


def _limitations(report: dict[str, Any], name: str) -> list[str]:
    data = report.get("dataset") or {}
    lines = [
        f"- Measured on {data.get('name', 'this dataset')}'s test split only: inputs unlike it (other image sizes, "
        'colour photos, other classes) are out of scope; the model cannot say "none of these".',
        "- Latency figures hold for the CPUs, thread counts and onnxruntime versions stated above; measure "
        "yours with `kdpipe bench --target`.",
    ]
    per_class = (((report.get("models") or {}).get("student") or {}).get("accuracy") or {}).get("per_class_top1") or {}
    if per_class:
        worst = sorted(per_class.items(), key=lambda kv: kv[1])[:2]
        lines.append("- Weakest classes: " + ", ".join(f"{c} ({pct(v)})" for c, v in worst) + ".")
    lines += [f"- {flag.rstrip('.')}." for flag in summary.flags(report)]
    return lines


def _provenance(report: dict[str, Any]) -> list[str]:
    lines = [f"- kdpipe {report.get('kdpipe_version', '?')}, report created {report.get('created', '?')}, "
             f"config `{report.get('config_file', '?')}`."]  # fmt: skip
    stages = report.get("stages") or {}
    if stages:
        lines.append("- Stage cache keys: " + ", ".join(f"{n} `{s.get('key', '')[:16]}`" for n, s in stages.items()))
    versions = report.get("versions") or {}
    if versions:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    shipped = ((report.get("models") or {}).get("teacher") or {}).get("shipped")
    if shipped:
        sha, key = shipped.get("sha256", "")[:16], shipped.get("cache_key", "")[:16]
        lines.append(f"- Teacher: shipped `{shipped.get('name')}` (sha256 `{sha}…`), made by "
                     f"`{shipped.get('command')}`, teacher cache key `{key}`.")  # fmt: skip
    return lines


def render_model_card(report: dict[str, Any]) -> str:
    """The card as Markdown; the model it describes is the one the report recommends shipping."""
    rec = summary.recommendation(report)
    name = rec["model"] or "student"
    status = {
        "ship": "recommended by the gates",
        "ungated": "no gates were evaluated",
        "none": "NOT recommended: no variant passes the student's gates",
        "empty": "no student in this run",
    }[rec["status"]]
    data = report.get("dataset") or {}
    lines = [f"# Model card: {name} ({data.get('name', '?')} classifier)", "", f"Status: **{status}**.", ""]
    lines += [*summary.ship_lines(report, rec), ""]
    verdict = summary.distillation_verdict(report) or "Not compared in this run (`distill.compare: [scratch]`)."
    sections = [
        ("What it is", _what(report, name)),
        ("Data", _data(report)),
        ("Accuracy", _accuracy(report, name)),
        ("Distillation against training alone", [verdict]),
        ("Latency", _latency(report)),
        ("Size and compute", _size(report)),
        ("Limitations", _limitations(report, name)),
        ("Provenance", _provenance(report)),
    ]
    for title, body in sections:
        lines += [f"## {title}", "", *body, ""]
    return "\n".join(lines)
