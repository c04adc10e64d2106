"""The bundle's runner reproduces every model's expected outputs on the machine that made them (dynamic int8
quantisation included: its expected logits are computed in the runner's own batches), and report.json's
`quantization` blocks describe the int8 variants' final files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import TINY, clean_env, deep_merge

VARIANTS = ["optimized", "fp16", "int8_dynamic", "int8_static"]
KDPIPE = [sys.executable, "-c", "from kdpipe.cli import entry; entry()"]


@pytest.fixture(scope="module")
def run_with_variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    # 100 samples: more than one of the runner's batches of 64, and a last batch of another size
    config = deep_merge(
        TINY, {"data": {"synthetic": {"test_size": 100}}, "export": {"variants": VARIANTS, "bundle_samples": 100}}
    )
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([*KDPIPE, "run"], cwd=root, capture_output=True, text=True, env=clean_env())
    assert out.returncode == 0, out.stderr
    return root


def test_runner_reproduces_every_models_expected_outputs(run_with_variants, tmp_path):
    root = run_with_variants
    bundle = tmp_path / "bundle"
    made = subprocess.run([*KDPIPE, "bundle", "-o", str(bundle)], cwd=root, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    ran = subprocess.run(
        [sys.executable, "runner.py", "spec.json", "--out", "results.json", "--quiet"],
        cwd=bundle, capture_output=True, text=True, env=clean_env(),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    checks = json.loads((bundle / "results.json").read_text())["samples_check"]
    assert set(checks) == {"student", "teacher", *(f"student-{v}" for v in VARIANTS)}
    for name, check in checks.items():
        assert check["samples"] == 100
        assert check["max_abs_diff"] == 0.0 and check["top1_agreement"] == 1.0, (name, check)


def test_quantization_blocks_name_the_final_int8_files(run_with_variants):
    root = run_with_variants
    report = json.loads((root / "kdpipe-out" / "report.json").read_text())
    for variant in VARIANTS:
        model = report["models"][f"student-{variant}"]
        if "int8" not in variant:
            assert "quantization" not in model, variant
            continue
        q = model["quantization"]
        final = root / "kdpipe-out" / q["file"]
        assert q["file"] == f"student-{variant}.onnx" and final.is_file()
        assert q["bytes"] == final.stat().st_size == model["onnx"]["file_bytes"]
        assert q["dtype"] == "int8"
    assert report["models"]["student-int8_static"]["quantization"]["calibration_samples"] > 0
