"""int8_fallback and qad_int8 from the CLI on the tiny synthetic pipeline: report.json, Markdown, HTML, bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe.cli import main
from tests.conftest import deep_merge

QUANT = {
    "export": {
        "variants": ["fp16", "int8_static", "int8_fallback", "qad_int8"],
        "quantization": {
            "calibration_samples": 32,
            "accuracy_budget": 0.0,
            "sensitivity_samples": 16,
            "max_fallback_nodes": 2,
            "qad": {"epochs": 1, "batch_size": 32},
        },
    },
    "benchmark": {"batch_sizes": [1], "pytorch_reference": False},
}


@pytest.fixture
def quant_run(write_config, monkeypatch, capsys) -> Path:
    from tests.conftest import TINY

    cfg = write_config(deep_merge(TINY, QUANT))
    monkeypatch.chdir(cfg.parent)
    code = main(["run", "-c", str(cfg)])
    assert code == 0, capsys.readouterr().err
    return cfg.parent


def test_quantised_variants_end_to_end(quant_run: Path, monkeypatch, capsys) -> None:
    out = quant_run / "kdpipe-out"
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    fallback = models["student-int8_fallback"]["quantization"]
    table = fallback["sensitivity"]
    assert table["samples"] == 16 and [r["rank"] for r in table["nodes"]] == list(range(1, len(table["nodes"]) + 1))
    steps = fallback["fallback"]["steps"]
    assert 1 <= len(steps) <= 3 and steps[0]["excluded"] == [] and all(s["p50_ms"] > 0 for s in steps)
    assert fallback["excluded"] == steps[fallback["fallback"]["chosen"]]["excluded"]
    qad = models["student-qad_int8"]["quantization"]["qad"]
    assert qad["epochs"] == 1 and len(qad["history"]) == 1 and qad["fake_quant_parity"]["top1_agreement"] >= 0.9
    assert 0 <= qad["start_val_top1"] <= qad["best_val_top1"] and qad["best_epoch"] in (0, 1)
    assert qad["views"] is None  # no cached teacher features here: fresh augmentation, as distillation had
    assert qad["dead_channels"] == {} and steps[0]["tried"] == 0 and all(s["tried"] >= 1 for s in steps[1:])
    for name in ("student-int8_static", "student-int8_fallback", "student-qad_int8"):
        assert 0 <= models[name]["accuracy"]["top1"] <= 1 and models[name]["latency"]["batch_1"]["p50_ms"] > 0
    assert models["student-qad_int8"]["precision"]["computes_in"] == "int8"
    assert models["student-fp16"]["precision"]["computes_in"] == "fp32"  # the CPU provider upcasts fp16
    md = (out / "report.md").read_text()
    assert "Int8 sensitivity of student-int8_fallback" in md and "QAD fine-tuned 1 epoch" in md
    assert main(["report", "--format", "html", "-o", str(quant_run / "r.html")]) == 0
    assert "Int8 sensitivity" in (quant_run / "r.html").read_text()


def test_qad_with_fitnet_is_refused_before_any_stage(write_config, monkeypatch, capsys) -> None:
    cfg = write_config({"distill": {"method": "fitnet"}, "export": {"variants": ["qad_int8"]}})
    monkeypatch.chdir(cfg.parent)
    assert main(["run", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "export.variants" in err and "qad_int8" in err and "fitnet" in err
    assert not (cfg.parent / ".kdpipe" / "teacher").exists()  # nothing ran
