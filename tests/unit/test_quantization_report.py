"""The quantisation section of report.md and the HTML report, from a hand-made report dict."""

from __future__ import annotations

from kdpipe.reporting.quantization import render_html, render_markdown, summary_rows


def node(rank: int, name: str, sqnr: float) -> dict:
    return {"rank": rank, "node": name, "op_type": "Conv", "quantized_only": {"top1": 0.8, "sqnr_db": sqnr},
            "fp32_only": {"top1": 0.85, "sqnr_db": 30.0}}  # fmt: skip


REPORT = {
    "models": {
        "student": {"accuracy": {"top1": 0.90}, "latency": {"batch_1": {"p50_ms": 1.0, "p90_ms": 1.2}}},
        "student-int8_fallback": {
            "variant": "int8_fallback",
            "accuracy": {"top1": 0.899},
            "precision": {"computes_in": "mixed: fp32+int8"},
            "latency": {"batch_1": {"p50_ms": 0.7, "p90_ms": 0.8}},
            "quantization": {
                "sensitivity": {
                    "samples": 500,
                    "fp32": {"top1": 0.9},
                    "int8": {"top1": 0.85, "sqnr_db": 12.0},
                    "nodes": [node(1, "conv_a", 8.0), node(2, "conv_b", 20.0)],
                },
                "fallback": {
                    "budget": 0.003,
                    "fp32_top1": 0.9,
                    "chosen": 1,
                    "within_budget": True,
                    "steps": [
                        {"step": 0, "excluded": [], "val_top1": 0.85, "sqnr_db": 12.0, "p50_ms": 0.6, "p90_ms": 0.7},
                        {
                            "step": 1,
                            "excluded": ["conv_a"],
                            "val_top1": 0.899,
                            "sqnr_db": 25.0,
                            "p50_ms": 0.7,
                            "p90_ms": 0.8,
                        },
                    ],
                },
            },
        },
    }
}


def test_summary_rows() -> None:
    rows = summary_rows(REPORT)
    assert rows[0] == ["student", "fp32", "90.00%", "–", "1.000 / 1.200"]
    assert rows[1] == ["student-int8_fallback", "mixed: fp32+int8", "89.90%", "-0.10 pp", "0.700 / 0.800"]


def test_markdown_has_the_ranked_table_and_the_chosen_step() -> None:
    text = "\n".join(render_markdown(REPORT))
    assert "Int8 sensitivity of student-int8_fallback on 500 validation images" in text
    assert "| 1 | conv_a | Conv | 8.0 |" in text
    assert "step 1 chosen (within budget)" in text and "| 1 ✔ | conv_a | 89.90% | -0.10 pp |" in text


def test_html_section_and_nothing_without_variants() -> None:
    assert "<section id='quantisation'>" in render_html(REPORT) and "conv_b" in render_html(REPORT)
    plain = {"models": {"student": REPORT["models"]["student"]}}
    assert render_markdown(plain) == [] and render_html(plain) == ""


def test_qad_line_names_the_dead_channels() -> None:
    qad = {"method": "kd", "epochs": 2, "best_val_top1": 0.9, "best_epoch": 2,
           "dead_channels": {"blocks.0.0.conv_dw": 2},
           "fake_quant_parity": {"top1_agreement": 0.99, "max_abs_diff": 0.1}}  # fmt: skip
    report = {"models": {"student": REPORT["models"]["student"], "student-qad_int8": {
        "variant": "qad_int8", "accuracy": {"top1": 0.9}, "quantization": {"qad": qad}}}}  # fmt: skip
    text = "\n".join(render_markdown(report))
    assert "2 dead channel(s)" in text and "`blocks.0.0.conv_dw` (2)" in text
    assert "2 dead channel(s) zeroed" in render_html(report)
