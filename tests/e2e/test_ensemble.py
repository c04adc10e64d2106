"""Several teachers end to end: each trained and cached on its own, one SimKD student of all of them exported as one
ONNX graph, the ensemble as the report's `teacher` (validated, exported, benchmarked), each teacher by name in the
report and the gates; bad ensembles refused in one line before any stage."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml

from kdpipe.cli import main
from kdpipe.config import load_config
from kdpipe.runner import run_pipeline
from tests.conftest import TINY, deep_merge
from tests.e2e.test_bad_input import assert_refused_before_any_stage

TEACHER = TINY["teacher"]
SEVERAL = {
    **{k: v for k, v in TINY.items() if k != "teacher"},
    "teachers": [{"name": "wide", **TEACHER}, {"name": "small", **TEACHER, "arch": "tiny_cnn", "weight": 3}],
    "gates": [
        {"metric": "top1", "model": "wide", "min": 0.0},
        {"metric": "top1_drop_vs_teacher", "model": "student", "max": 1.0},
        {"metric": "parity_max_abs_diff", "model": "student", "max": 1.0e-4},
        {"metric": "parity_max_abs_diff", "model": "teacher", "max": 1.0e-4},
    ],
}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_several_teachers_end_to_end(project):
    path = project / "pipeline.yaml"
    path.write_text(yaml.safe_dump(SEVERAL))
    lines: list[str] = []
    report = run_pipeline(path, echo=lines.append)
    ran = [line.split()[1] for line in lines if line.startswith("▶")]
    assert ran == ["teacher:wide", "teacher:small", "features:wide", "features:small", "distill", "validate",
                   "export", "benchmark"]  # fmt: skip
    models = report["models"]
    assert list(models)[:3] == ["teacher", "wide", "small"]
    teacher, wide, small = models["teacher"], models["wide"], models["small"]
    assert teacher["members"] == ["wide", "small"] and teacher["weights"] == [0.25, 0.75]
    assert teacher["arch"] == "ensemble(tiny_cnn_wide, tiny_cnn)"
    assert teacher["parameters"] == wide["parameters"] + small["parameters"]
    assert (wide["weight"], small["weight"], wide["member_of"]) == (0.25, 0.75, "teacher")
    for entry in (teacher, wide, small):
        assert 0 <= entry["accuracy"]["top1"] <= 1 and entry["val_top1"] is not None
    assert "latency" in teacher and "onnx" in teacher and "onnx" not in wide  # the ensemble is what is measured
    cfg = load_config(path)
    validate = json.loads(next((cfg.cache_dir / "validate").glob("*/metrics.json")).read_text())
    assert set(validate["teachers"]) == {"wide", "small"}
    # the student: body, a projector and the frozen head of each teacher, counted in full, one graph with parity
    student = models["student"]
    parts = student["parameters_breakdown"]
    assert student["parameters"] == parts["total"] == parts["body"] + parts["projector"] + parts["head"]
    assert student["onnx"]["parity"]["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(cfg.output_dir / "student.onnx"))
    assert [i.name for i in graph.graph.input] == ["input"] and len(graph.graph.output) == 1
    assert onnx.load(str(cfg.output_dir / "teacher.onnx")).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4
    assert all(g["passed"] for g in report["gates"]) and len(report["gates"]) == 4
    markdown = (cfg.output_dir / "report.md").read_text()
    assert "The teacher is an ensemble of 2: wide (tiny_cnn_wide, weight 0.25)" in markdown
    html = project / "report.html"
    assert main(["report", "--format", "html", "-o", str(html)]) == 0
    assert "The teacher is an ensemble of 2" in html.read_text()
    assert main(["gate", "--gate", "small.top1 >= 0"]) == 0

    # changing one teacher re-runs its own work (and what reads every teacher), not the other's
    lines.clear()
    run_pipeline(path, until="features", echo=lines.append, gates=())
    assert [line.split()[1] for line in lines if line.startswith("▶")] == []
    cfg = load_config(path, ["teachers.1.train.lr=0.2"])
    lines.clear()
    run_pipeline(cfg, until="features", echo=lines.append)
    assert [line.split()[1] for line in lines if line.startswith("▶")] == ["teacher:small", "features:small"]
    assert [line.split()[1] for line in lines if line.startswith("✓") and "cached" in line] == [
        "teacher:wide", "features:wide",
    ]  # fmt: skip
    assert main(["clean", "--keep-last"]) == 0  # both teachers' entries of the last run are kept, in one folder
    assert len(list((cfg.cache_dir / "teacher").glob("[0-9a-f]*"))) == 2


def test_a_teacher_trained_alone_is_reused_by_an_ensemble(project):
    alone = project / "alone.yaml"
    alone.write_text(yaml.safe_dump({**TINY, "teacher": {**TEACHER, "arch": "tiny_cnn"}}))
    run_pipeline(alone, until="teacher", echo=lambda _: None)
    both = project / "both.yaml"
    both.write_text(yaml.safe_dump(SEVERAL))
    lines: list[str] = []
    run_pipeline(both, until="teacher", echo=lines.append)
    assert [line.split()[1] for line in lines if line.startswith("▶")] == ["teacher:wide"]


def _teacher_files(project: Path) -> None:
    import torch

    from kdpipe.ml.models.zoo import create_model

    for name, classes in (("four", 4), ("three", 3)):
        model = create_model("tiny_cnn", num_classes=classes, in_channels=1).eval()
        torch.save(model.state_dict(), project / f"{name}.pt")
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 1, 12, 12)), project / f"{name}.ts")
    (project / "models.py").write_text(
        "from torch import nn\n\n\ndef sized(num_classes=4):  # a classifier sized for 16x16 images\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),"
        " nn.Linear(4 * 16 * 16, num_classes))\n"
    )


def _ensemble(*members: dict, **extra: object) -> dict:
    teachers = [{"name": f"t{i}", **m} for i, m in enumerate(members)]
    return deep_merge({k: v for k, v in TINY.items() if k != "teacher"}, {"teachers": teachers, **extra})


FOUR = {"source": "checkpoint", "arch": "tiny_cnn", "path": "four.pt"}
IDS = ["classes", "torchscript-classes", "input-size", "names", "teacher-and-teachers", "torchscript-simkd", "crd",
       "compare-crd_kd", "data-free", "qad", "member-latency-gate"]  # fmt: skip


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (
            _ensemble(FOUR, {"source": "checkpoint", "arch": "tiny_cnn", "path": "three.pt"}),
            ("teachers.1.path: three.pt (tiny_cnn) holds a classifier for 3 classes", "the data has 4 classes"),
        ),
        (
            _ensemble(FOUR, {"source": "torchscript", "path": "three.ts"}, distill={"method": "kd"}),
            ("teachers.1.path: three.ts gives 3 logits per image",),
        ),
        (
            _ensemble(FOUR, {"source": "python", "entrypoint": "models.py:sized"}),
            ("teachers.1.entrypoint: models.py:sized fails on 1×12×12 images", "built for another image size"),
        ),
        (_ensemble(FOUR, {**FOUR, "name": "t0"}), ("teachers.1.name: 't0' is also teachers.0's name",)),
        ({**TINY, "teachers": [{"name": "a", **FOUR}, {"name": "b", **FOUR}]}, ("teacher and teachers are both",)),
        (
            _ensemble(FOUR, {"source": "torchscript", "path": "four.ts"}),
            ("teachers.1.source: SimKD reuses the teacher's classifier, which cannot be cut out of a TorchScript",),
        ),
        (_ensemble(FOUR, FOUR, distill={"method": "crd"}), ("distill.method: crd cannot learn from several teachers",)),
        (
            _ensemble(FOUR, FOUR, distill={"method": "kd", "compare": ["crd_kd"]}),
            ("distill.compare: crd_kd cannot learn from several teachers",),
        ),
        (
            _ensemble(FOUR, FOUR, distill={"method": "kd", "data": "synthetic"}),
            ("distill.data: synthetic trains a generator against one teacher",),
        ),
        (
            _ensemble(FOUR, FOUR, export={"variants": ["qad_int8"]}),
            ("export.variants: qad_int8 fine-tunes the student against one teacher",),
        ),
        (
            _ensemble(FOUR, FOUR, gates=[{"metric": "p50_ms", "model": "t1", "batch_size": 1, "max": 9}]),
            ("gate 't1.p50_ms@1 <= 9'", "exported and benchmarked together, as 'teacher'"),
        ),
    ],
    ids=IDS,
)
def test_bad_ensembles_are_refused_before_any_stage(project, capsys, monkeypatch, config, names):
    _teacher_files(project)
    (project / "pipeline.yaml").write_text(yaml.safe_dump(config))
    assert_refused_before_any_stage(project, capsys, monkeypatch, *names)


def test_every_teachers_features_are_cached_and_replayed(project, monkeypatch):
    """features.enabled: each teacher's features computed once, in its own entry; KD and FitNet train on all of
    them from the cache (the same views for every teacher), and no teacher runs during distillation."""
    from kdpipe.stages.distillers import OnlineTeacher

    path = project / "pipeline.yaml"
    extra = {"features": {"enabled": True, "views": 2}, "distill": {"method": "kd", "compare": ["fitnet"]}}
    path.write_text(yaml.safe_dump(deep_merge(SEVERAL, extra)))
    calls = []
    monkeypatch.setattr(OnlineTeacher, "__call__", lambda self, batch: calls.append(1))
    report = run_pipeline(path, until="distill", echo=lambda _: None)
    assert calls == []
    cfg = load_config(path)
    infos = [json.loads(p.read_text()) for p in sorted((cfg.cache_dir / "features").glob("*/features.json"))]
    assert len(infos) == 2 and all(i["views"] == 2 for i in infos)
    assert sorted(i["feature_shape"][0] for i in infos) == [16, 32]  # tiny_cnn's and tiny_cnn_wide's maps
    rows = {r["method"]: r for r in report["comparison"]}
    assert set(rows) == {"kd", "fitnet"} and all(r["val_top1"] is not None for r in rows.values())
