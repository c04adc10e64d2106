"""``distill.data: synthetic`` end to end on the tiny synthetic dataset: the student is distilled from a generator's
images alone, exports with a generated-image-calibrated int8 variant, and every report says that 0 real training
images were used; the second run is a cache hit. Bad input is refused before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdpipe.cli import main
from tests.conftest import TINY, deep_merge
from tests.e2e.test_bad_input import assert_one_line_exit_2, run_cli

DATAFREE = {
    "distill": {
        "method": "kd",
        "compare": ["simkd"],
        "data": "synthetic",
        "kd": {"alpha": 1.0},
        "datafree": {"steps_per_epoch": 3, "batch_size": 16, "pool_size": 48, "samples": 32},
    },
    "export": {"variants": ["int8_static"], "quantization": {"calibration_samples": 24}},
}
TORCHSCRIPT = {"source": "torchscript", "path": "t.ts"}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(project: Path, extra: dict) -> Path:
    path = project / "pipeline.yaml"
    path.write_text(yaml.safe_dump(deep_merge(TINY, extra)))
    return path


def test_data_free_run_exports_and_reports_zero_real_images(project, capsys):
    config = write(project, DATAFREE)
    assert main(["run", "-c", str(config)]) == 0
    report = json.loads((project / "kdpipe-out" / "report.json").read_text())
    data = report["training_data"]
    assert data["source"] == "synthetic" and data["real_training_images"] == 0
    assert set(data["generator"]["terms"]) == {"bn", "ce", "entropy", "diversity", "adversarial"}
    assert data["generator"]["replay"] == "stored"  # kd needs only logits: those stored with each generated image
    assert data["samples"]["count"] == 32 and len(data["samples"]["grid"]["counts"]) == 4
    record = json.loads((project / ".kdpipe" / "last_run.json").read_text())["stages"]
    entry = project / ".kdpipe" / "distill" / record["distill"]["key"]
    assert (entry / "generator.pt").is_file() and (entry / "generator.json").is_file()
    samples = np.load(entry / "synthetic.npy")
    assert samples.shape == (32, 1, 12, 12) and samples.dtype == np.uint8
    features = json.loads((project / ".kdpipe" / "features" / record["features"]["key"] / "metrics.json").read_text())
    assert features == {"enabled": False}
    int8 = report["models"]["student-int8_static"]
    assert int8["quantization"]["calibration_samples"] == 24  # generated images: no training image was read
    assert [r["method"] for r in report["comparison"]] == ["kd", "simkd"]
    md = (project / "kdpipe-out" / "report.md").read_text()
    assert "trained without the original data: 0 real training images" in md
    card = (project / "kdpipe-out" / "MODEL_CARD.md").read_text()
    assert "**Training data**: The student was trained without the original data" in card
    capsys.readouterr()
    assert main(["report", "-c", str(config), "--format", "html"]) == 0
    page = capsys.readouterr().out
    assert "Training data: synthetic" in page and 'alt="Generated images per class"' in page

    assert main(["run", "-c", str(config)]) == 0  # nothing changed: every stage is a cache hit
    again = json.loads((project / "kdpipe-out" / "report.json").read_text())
    assert all(stage["cached"] for stage in again["stages"].values())


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"distill": {"method": "scratch"}}, ("distill.method", "scratch", "synthetic")),
        ({"distill": {"compare": ["scratch"]}}, ("distill.compare", "scratch")),
        ({"distill": {"method": "crd", "crd": {"negatives": 8}}}, ("distill.method", "crd", "identity")),
        ({"distill": {"compare": ["crd_kd"]}}, ("distill.compare", "crd_kd", "identity")),  # not "more negatives"
        ({"runtime": {"nproc": 2}}, ("runtime.nproc",)),
        ({"export": {"variants": ["qad_int8"]}}, ("export.variants", "qad_int8", "synthetic")),
        (
            {"teacher": TORCHSCRIPT, "distill": {"compare": [], "datafree": {"bn": 1.0}}},
            ("distill.datafree.bn", "Torch"),
        ),
        ({"distill": {"datafree": {"bn": 0, "ce": 0, "entropy": 0}}}, ("distill.datafree", "all 0")),
        ({"distill": {"datafree": {"samples": 64, "pool_size": 32}}}, ("distill.datafree", "pool_size")),
    ],
)
def test_bad_data_free_input_is_refused_before_any_stage(project, capsys, extra, names):
    if extra.get("teacher") == TORCHSCRIPT:
        import torch

        from kdpipe.ml.models.zoo import create_model

        model = create_model("tiny_cnn_wide", num_classes=4, in_channels=1).eval()
        torch.jit.trace(model, torch.zeros(2, 1, 12, 12)).save(str(project / "t.ts"))
    config = write(project, deep_merge(DATAFREE, extra))
    code, err = run_cli(capsys, "run", "-c", str(config))
    assert_one_line_exit_2(code, err, *names)
    assert not (project / ".kdpipe" / "teacher").exists()  # no stage ran


USER_CODE = """
from torch import nn


def build_teacher(num_classes=4, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))
"""


def test_teacher_without_batchnorm_leaves_the_bn_term_out_or_refuses_it_when_asked_for(project, capsys):
    (project / "models.py").write_text(USER_CODE)
    teacher = {"teacher": {"source": "python", "entrypoint": "models.py:build_teacher", "arch": None}}
    asked = write(project, deep_merge(DATAFREE, {**teacher, "distill": {"compare": [], "datafree": {"bn": 2.0}}}))
    code, err = run_cli(capsys, "run", "-c", str(asked), "--until", "distill")
    assert_one_line_exit_2(code, err, "distill.datafree.bn", "no BatchNorm layers")

    config = write(project, deep_merge(DATAFREE, {**teacher, "distill": {"compare": []}}))
    assert main(["run", "-c", str(config), "--until", "distill"]) == 0
    record = json.loads((project / ".kdpipe" / "last_run.json").read_text())["stages"]
    metrics = json.loads((project / ".kdpipe" / "distill" / record["distill"]["key"] / "metrics.json").read_text())
    generator = metrics["training_data"]["generator"]
    assert generator["terms"] == ["ce", "entropy", "diversity", "adversarial"]
    assert generator["left_out"] == {"bn": "the teacher has no BatchNorm layers"}
