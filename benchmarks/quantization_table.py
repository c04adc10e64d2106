"""The quantisation table of docs/benchmarks.md from one run's report.json, and the issue's targets checked against it.

    python benchmarks/quantization_table.py configs/kdpipe-out-quantization/report.json

Prints fp32 / int8_static / int8_fallback / qad_int8: test top-1, the change against fp32, batch-1 p50/p90 and the
precision ORT computes in; then whether plain int8 loses >= 1 point and whether int8_fallback and qad_int8 come
within 0.3 point of fp32 while faster than it (p50, batch 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kdpipe.reporting.quantization import SUMMARY_HEAD, summary_rows

MODELS = ("student", "student-int8_static", "student-int8_fallback", "student-qad_int8")


def main(path: str) -> int:
    report = json.loads(Path(path).read_text())
    rows = [r for r in summary_rows(report) if r[0] in MODELS]
    print("| " + " | ".join(SUMMARY_HEAD) + " |")
    print("|" + "---|" * len(SUMMARY_HEAD))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    models = report["models"]
    fp32_top1 = models["student"]["accuracy"]["top1"]
    fp32_p50 = models["student"]["latency"]["batch_1"]["p50_ms"]
    static = models.get("student-int8_static")
    if static:
        loss = fp32_top1 - static["accuracy"]["top1"]
        print(f"int8_static loses {100 * loss:.2f} points (target >= 1): {'met' if loss >= 0.01 else 'NOT met'}")
    for name in MODELS[2:]:
        m = models.get(name)
        if not m:
            continue
        loss = fp32_top1 - m["accuracy"]["top1"]
        ratio = m["latency"]["batch_1"]["p50_ms"] / fp32_p50
        ok = loss <= 0.003 and ratio < 1
        print(f"{name}: {100 * loss:.2f} points below fp32 (target <= 0.3), p50 {ratio:.2f}x fp32 (target < 1): "
              f"{'met' if ok else 'NOT met'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "kdpipe-out/report.json"))
