"""Bring your own teacher and student, end to end on tiny synthetic data: timm CNNs of several families, a
ViT teacher (token features), a user-code teacher; SimKD and KD distil, validate and export (parity checked).

Every run shares one project folder and cache (session-scoped), so a teacher trains once however many
tests use it. Images are 32×32, one epoch, 96 training images: the point is that it works, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdpipe.cli import main
from kdpipe.runner import run_pipeline
from tests.conftest import deep_merge

BASE = {
    "data": {
        "dataset": "synthetic",
        "synthetic": {"num_classes": 4, "channels": 1, "image_size": 32, "train_size": 96, "test_size": 32},
    },
    "teacher": {"train": {"epochs": 1, "batch_size": 32}},
    "distill": {"train": {"epochs": 1, "batch_size": 32}},
    "export": {"parity": {"samples": 16}, "bundle_samples": 4, "teacher": False, "exporter": "torchscript"},
    "runtime": {"threads": 1, "progress": False},
}
MODELS_PY = """
from torch import nn


def build_teacher(num_classes=4, in_channels=1, width=32):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )
"""
# (teacher section, how the teacher is cut for SimKD)
TEACHERS = {
    "resnet10t": ({"arch": "timm:resnet10t"}, "map"),
    "mobilenetv3_small_050": ({"arch": "timm:mobilenetv3_small_050"}, "map"),
    "efficientnet": ({"arch": "timm:test_efficientnet"}, "map"),
    "convnext": ({"arch": "timm:test_convnext"}, "map"),
    "regnetx_002": ({"arch": "timm:regnetx_002"}, "map"),
    "vit": ({"arch": "timm:test_vit", "kwargs": {"patch_size": 8}}, "pre_logits"),
    "user_code": ({"source": "python", "entrypoint": "models.py:build_teacher"}, "fx"),
}


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own_teacher")
    (root / "models.py").write_text(MODELS_PY)
    return root


def run(project: Path, name: str, extra: dict, until: str = "export") -> dict:
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump(deep_merge(BASE, extra)))
    return run_pipeline(path, until=until, echo=lambda s: None)


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_simkd_and_kd_from_each_teacher_distil_validate_and_export(project, teacher):
    section, mode = TEACHERS[teacher]
    report = run(
        project,
        f"simkd-{teacher}",
        {"teacher": section, "distill": {"method": "simkd", "compare": ["kd"], "student": "timm:test_byobnet"}},
    )
    student = report["models"]["student"]
    expected_arch = section.get("arch") or f"python:{project / 'models.py'}:build_teacher"
    assert report["models"]["teacher"]["arch"] == expected_arch
    assert student["method"] == "simkd"
    metrics = json.loads(
        (project / ".kdpipe" / "distill" / report["stages"]["distill"]["key"] / "metrics.json").read_text()
    )
    assert metrics["feature_modes"] == {"student": "map", "teacher": mode}
    assert {row["method"] for row in report["comparison"]} == {"simkd", "kd"}
    parity = student["onnx"]["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
    assert "top1" in student["accuracy"] and "agreement_with_teacher" in student["accuracy"]


@pytest.mark.parametrize(
    ("student", "kwargs"),
    [
        ("timm:resnet10t", {}),
        ("timm:mobilenetv3_small_050", {}),
        ("timm:test_efficientnet", {}),
        ("timm:test_convnext", {}),
        ("timm:regnetx_002", {}),
        ("timm:test_vit", {"patch_size": 8}),
    ],
)
def test_each_timm_model_is_a_kd_student_exported_as_one_graph(project, student, kwargs):
    report = run(
        project,
        f"kd-{student.split(':')[1]}",
        {
            "teacher": TEACHERS["user_code"][0],
            "distill": {"method": "kd", "student": student, "student_kwargs": kwargs},
        },
    )
    onnx = report["models"]["student"]["onnx"]
    assert onnx["parity"]["top1_agreement"] == 1.0 and onnx["parity"]["max_abs_diff"] < 1e-4


def test_a_vit_teacher_simkd_student_exports_with_dynamo_and_variants(project):
    import onnx

    report = run(
        project,
        "vit-dynamo",
        {
            "teacher": TEACHERS["vit"][0],
            "distill": {"method": "simkd", "student": "timm:test_byobnet"},
            "export": {"exporter": "dynamo", "variants": ["optimized", "int8_dynamic"]},
        },
    )
    assert report["models"]["student"]["onnx"]["parity"]["top1_agreement"] == 1.0
    for variant in ("student-optimized", "student-int8_dynamic"):
        assert report["models"][variant]["accuracy"]["samples"] == 32
    graph = onnx.load(project / "kdpipe-out" / "student.onnx")
    assert len(graph.graph.input) == 1 and len(graph.graph.output) == 1


def test_a_vit_student_exports_attention_gelu_and_layernorm(project):
    import onnx

    report = run(
        project,
        "vit-student",
        {
            "teacher": TEACHERS["user_code"][0],
            "distill": {"method": "kd", "student": "timm:test_vit", "student_kwargs": {"patch_size": 8}},
            "export": {"exporter": "dynamo", "opset": 18},
        },
    )
    assert report["models"]["student"]["onnx"]["opset"] == 18
    ops = {n.op_type for n in onnx.load(project / "kdpipe-out" / "student.onnx").graph.node}
    assert {"Softmax", "LayerNormalization", "Erf", "MatMul"} <= ops  # attention, LayerNorm, exact GELU


FAST = ["--set", "benchmark.min_seconds=0", "--set", "benchmark.min_runs=2", "--set", "benchmark.rounds=2",
        "--set", "benchmark.warmup=1", "--set", "benchmark.batch_sizes=[1]", "--set", "runtime.progress=false",
        "--set", "data.synthetic.train_size=128", "--set", "export.parity.samples=16"]  # fmt: skip


@pytest.mark.parametrize(
    "teacher",
    [
        '{source: python, entrypoint: "models.py:build_teacher", train: {epochs: 1}}',
        '{source: train, arch: "timm:resnet10t", train: {epochs: 1}}',
    ],
    ids=["user_code", "timm"],
)
def test_the_issue_configs_run_from_the_cli(tmp_path, monkeypatch, teacher):
    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "pipeline.yaml").write_text(
        "data: {dataset: synthetic}\n"
        f"teacher: {teacher}\n"
        'distill: {method: simkd, student: "timm:mobilenetv3_small_050", train: {epochs: 1}}\n'
    )
    monkeypatch.chdir(tmp_path.parent)  # not the config's folder: models.py resolves against the config
    assert main(["run", "-c", str(tmp_path / "pipeline.yaml"), *FAST]) == 0
    report = json.loads((tmp_path / "kdpipe-out" / "report.json").read_text())
    assert report["models"]["teacher"]["arch"] == (
        f"python:{(tmp_path / 'models.py').resolve()}:build_teacher" if "python" in teacher else "timm:resnet10t"
    )
    assert report["models"]["student"]["onnx"]["parity"]["top1_agreement"] == 1.0


def test_fitnet_aligns_with_a_vit_teachers_pre_logits(project):
    report = run(
        project,
        "vit-fitnet",
        {"teacher": TEACHERS["vit"][0], "distill": {"method": "fitnet", "student": "timm:test_byobnet"}},
        until="distill",
    )
    assert report["models"]["student"]["method"] == "fitnet"


def test_a_student_bigger_than_its_teacher_fails_before_training_when_required(tmp_path):
    from kdpipe.errors import ConfigError

    project = tmp_path
    (project / "models.py").write_text(MODELS_PY)
    extra = {
        "teacher": TEACHERS["user_code"][0],
        "distill": {"method": "simkd", "student": "timm:resnet10t", "require_smaller": True},
    }
    with pytest.raises(ConfigError) as info:
        run(project, "too-big", extra, until="distill")
    msg = str(info.value)
    assert (
        msg.startswith("distill.require_smaller: the deployable student has ") and "not fewer than the teacher's" in msg
    )
    assert "(body " in msg and "+ projector " in msg and info.value.exit_code == 2
    assert not list((project / ".kdpipe" / "distill").glob("*/student.*"))  # nothing trained or committed
    path = project / "too-big-warns.yaml"
    path.write_text(
        yaml.safe_dump(deep_merge(BASE, {**extra, "distill": {**extra["distill"], "require_smaller": False}}))
    )
    said: list[str] = []
    run_pipeline(path, until="distill", echo=said.append)
    assert any(line.startswith("warning: distill.student: the deployable student has ") for line in said), said


def test_a_loaded_teacher_at_chance_is_refused_before_distilling(project):
    import torch

    from kdpipe.errors import ConfigError
    from kdpipe.ml.models.weights import save_weights
    from kdpipe.ml.models.zoo import create_model

    model = create_model("timm:test_convnext", num_classes=4, in_channels=1)
    with torch.no_grad():
        model.get_classifier().weight.zero_()
        model.get_classifier().bias.copy_(torch.tensor([9.0, 0, 0, 0]))  # always class 0: 25% on 4 classes
    save_weights(model, project / "chance.safetensors")
    extra = {"teacher": {"source": "checkpoint", "arch": "timm:test_convnext", "path": "chance.safetensors"}}
    with pytest.raises(ConfigError) as info:
        run(project, "chance", {**extra, "distill": {"method": "kd", "student": "timm:test_byobnet"}}, until="distill")
    msg = str(info.value)
    assert msg.startswith("teacher: the loaded teacher (checkpoint timm:test_convnext) scores ")
    assert "normalisation" in msg and "timm pretrained_cfg" in msg and "\n" not in msg
    extra["teacher"]["check_accuracy"] = False
    report = run(
        project, "chance-ok", {**extra, "distill": {"method": "kd", "student": "timm:test_byobnet"}}, "distill"
    )
    assert report["models"]["student"]["method"] == "kd"


def test_preflight_builds_own_models_where_the_stages_will(tmp_path, monkeypatch):
    from kdpipe import preflight as pf
    from kdpipe.config import load_config
    from kdpipe.errors import ConfigError

    (tmp_path / "models.py").write_text(MODELS_PY)
    monkeypatch.chdir(tmp_path.parent)
    every = {"teacher", "features", "distill", "validate", "export", "benchmark"}

    def cfg(extra):
        (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(BASE, extra)))
        return load_config(tmp_path / "pipeline.yaml")

    pf.preflight(
        cfg({"teacher": TEACHERS["user_code"][0], "distill": {"student": "python:models.py:build_teacher"}}), every
    )
    pf.preflight(
        cfg({"teacher": TEACHERS["vit"][0], "distill": {"method": "fitnet", "student": "timm:test_byobnet"}}), every
    )
    with pytest.raises(ConfigError, match=r"^teacher.entrypoint: entry point .*models.py has no function 'nope'"):
        pf.preflight(cfg({"teacher": {"source": "python", "entrypoint": "models.py:nope"}}), every)
    with pytest.raises(ConfigError, match=r"^distill.student: unknown timm model 'resnet10'"):
        pf.preflight(cfg({"distill": {"student": "timm:resnet10"}}), every)


def test_kdpipe_models_names_the_adapters(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "timm:<name>" in out and "python:<file.py or package.module>:<function>" in out and "resnet8" in out


def test_editing_the_users_code_changes_the_cache_keys(tmp_path):
    import os

    from kdpipe.config import load_config
    from kdpipe.runner import plan

    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "students.py").write_text(MODELS_PY)
    extra = {"teacher": TEACHERS["user_code"][0], "distill": {"student": "python:students.py:build_teacher"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(deep_merge(BASE, extra)))

    def keys():
        return {s.stage: s.key for s in plan(load_config(tmp_path / "p.yaml"))}

    def edit(name):
        (tmp_path / name).write_text((tmp_path / name).read_text() + "\n# edited\n")
        os.utime(tmp_path / name, ns=(1, 1))  # a new mtime even on a coarse clock

    first = keys()
    edit("students.py")
    second = keys()
    assert second["teacher"] == first["teacher"] and second["distill"] != first["distill"]
    edit("models.py")
    assert keys()["teacher"] != second["teacher"]


def test_a_teacher_kdpipe_trained_reloads_with_the_normalisation_it_learnt(project):
    import shutil

    trained = run(project, "convnext-trained", {"teacher": TEACHERS["convnext"][0]}, until="teacher")
    entry = project / ".kdpipe" / "teacher" / trained["stages"]["teacher"]["key"]
    shutil.copyfile(entry / "teacher.safetensors", project / "convnext.safetensors")
    section = {"source": "checkpoint", "arch": "timm:test_convnext", "path": "convnext.safetensors"}
    loaded = run(project, "convnext-loaded", {"teacher": section}, until="teacher")
    spec = json.loads(
        (project / ".kdpipe" / "teacher" / loaded["stages"]["teacher"]["key"] / "teacher.json").read_text()
    )
    # not timm's ImageNet statistics: the data's, recorded in the file when kdpipe trained it
    assert spec["preprocessing_source"] == "the weights file's metadata" and spec["input_adapter"] is None
    assert loaded["models"]["teacher"]["val_top1"] == trained["models"]["teacher"]["val_top1"]
