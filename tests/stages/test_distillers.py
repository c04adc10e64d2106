"""Distillation methods in one harness: simkd, kd, fitnet, scratch, and the comparison table."""

from __future__ import annotations

import json
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig, DistillMethod, load_config
from kdpipe.errors import ConfigError
from kdpipe.ml.data.memory import Batch, load_dataset, make_splits
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.zoo import count_parameters, create_model
from kdpipe.ml.train.training import accuracy, predict
from kdpipe.reporting.html import render_html
from kdpipe.reporting.report import render_markdown
from kdpipe.runner import run_pipeline
from kdpipe.stages.distillers import DISTILLERS, DataInfo, OnlineTeacher, TeacherParts, load_student
from kdpipe.stages.distillers.kd import kd_loss

METHODS = ["simkd", "kd", "fitnet", "scratch"]
PLAIN = count_parameters(create_model("tiny_cnn", num_classes=4, in_channels=1))
INFO = DataInfo(num_classes=4, input_shape=(1, 12, 12), classes=["a", "b", "c", "d"])


def _batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g), torch.arange(n))


def _teacher() -> tuple[nn.Module, TeacherParts]:
    torch.manual_seed(1)
    model = create_model("tiny_cnn_wide", num_classes=4, in_channels=1).eval()
    return model, TeacherParts("tiny_cnn_wide", split_model(model, INFO.example()))


def test_the_config_and_the_registry_name_the_same_methods():
    every = [*METHODS, "crd", "crd_kd", "dkd", "zipf_ls"]  # the newer ones: tests/stages/test_{crd,dkd,zipf}.py
    assert sorted(typing.get_args(DistillMethod)) == DISTILLERS.names() == sorted(every)
    conf = DistillConfig()
    assert (conf.method, conf.compare) == ("simkd", [])
    assert (conf.kd.temperature, conf.kd.alpha, conf.fitnet.beta) == (4, 0.9, 100)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_saves_and_rebuilds_from_its_spec(write_config, method):
    path = write_config({"distill": {"method": method, "train": {"epochs": 1}}})
    report = run_pipeline(path, until="distill", echo=lambda s: None)
    cfg = load_config(path)
    model, spec = load_student(cfg.output_dir)  # rebuilt from student.json alone, no teacher file
    assert spec["method"] == method and report["models"]["student"]["method"] == method
    data = load_dataset(cfg)
    splits = make_splits(cfg, data)
    logits = predict(model, splits.val_x, data.mean, data.std, 512, torch.device("cpu"))
    assert accuracy(logits, splits.val_y) == report["models"]["student"]["val_top1"]  # the selected weights
    assert count_parameters(model) == report["models"]["student"]["parameters"]
    if method != "simkd":  # a plain zoo student: its file loads straight into the architecture
        plain = create_model("tiny_cnn", num_classes=4, in_channels=1)
        plain.load_state_dict(torch.load(cfg.output_dir / "student.pt", weights_only=True))
        torch.testing.assert_close(plain.eval()(splits.val_x.float()), model(splits.val_x.float()))
        assert count_parameters(model) == PLAIN


@pytest.mark.parametrize("method", METHODS)
def test_a_trained_student_rebuilt_from_its_spec_gives_identical_logits(method):
    distiller = DISTILLERS.get(method)()
    model, parts = _teacher()
    conf = DistillConfig(student="tiny_cnn", method=method)
    torch.manual_seed(0)
    built = distiller.build(parts, "tiny_cnn", INFO, conf)
    signals = OnlineTeacher(model, parts.split, distiller.signals, torch.device("cpu"))
    optimizer = torch.optim.SGD([p for p in built.trainable.parameters() if p.requires_grad], lr=0.1)
    built.trainable.train()
    for step in range(2):
        batch = _batch(seed=step)
        loss = distiller.loss(built, batch, signals(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rebuilt = type(distiller).rebuild(json.loads(json.dumps(built.spec)))
    rebuilt.load_state_dict(built.model.state_dict())
    x = _batch(seed=9).x
    assert torch.equal(rebuilt.eval()(x), built.model.eval()(x))


def test_kd_loss_is_hintons_formula():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    t = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 2.5]])
    y = torch.tensor([0, 2])
    temp = 3.0
    p = torch.softmax(t / temp, 1)
    kl = (p * (p.log() - torch.log_softmax(s / temp, 1))).sum(1).mean()  # KL(teacher ‖ student), per sample
    ce = -torch.log_softmax(s, 1)[torch.arange(2), y].mean()
    torch.testing.assert_close(kd_loss(s, t, y, temp, alpha=1.0), temp**2 * kl)  # the T² scaling
    torch.testing.assert_close(kd_loss(s, t, y, temp, alpha=0.0), ce)  # alpha 0: pure cross-entropy
    torch.testing.assert_close(kd_loss(s, t, y, temp, alpha=0.9), 0.1 * ce + 0.9 * temp**2 * kl)
    torch.testing.assert_close(kd_loss(s, s, y, 7.0, alpha=1.0), torch.tensor(0.0))


def test_fitnet_regressor_is_training_only_and_the_student_runs_once_per_step():
    model, parts = _teacher()
    distiller = DISTILLERS.get("fitnet")()
    torch.manual_seed(0)
    built = distiller.build(parts, "tiny_cnn", INFO, DistillConfig(student="tiny_cnn", method="fitnet"))
    assert count_parameters(built.model) == PLAIN == distiller.parameter_breakdown(built)["total"]
    regressor = built.trainable.regressor
    assert count_parameters(built.trainable) == PLAIN + count_parameters(regressor)
    assert not any(p is q for p in built.model.parameters() for q in regressor.parameters())
    calls = []
    built.trainable.body.register_forward_hook(lambda *_: calls.append(1))
    batch = _batch()
    teacher = OnlineTeacher(model, parts.split, distiller.signals, torch.device("cpu"))(batch)
    assert set(teacher) == {"features"} and teacher["features"].shape[1:] == parts.split.feature_shape
    built.trainable.train()
    loss = distiller.loss(built, batch, teacher)
    assert len(calls) == 1
    loss.backward()
    assert all(p.grad is not None for p in regressor.parameters())
    assert all(p.grad is not None for p in built.model.parameters())  # the deployable is what trains
    hint = F.mse_loss(regressor(built.trainable.body(batch.x)), teacher["features"])
    ce = F.cross_entropy(built.trainable(batch.x), batch.y)
    torch.testing.assert_close(loss, ce + 100 * hint)


def test_scratch_needs_no_teacher_signals():
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher must not run")

    distiller = DISTILLERS.get("scratch")()
    assert distiller.signals == frozenset()
    batch = _batch()
    signals = OnlineTeacher(Exploding(), None, distiller.signals, torch.device("cpu"))(batch)
    assert signals == {}
    torch.manual_seed(0)
    built = distiller.build(TeacherParts(None, None), "tiny_cnn", INFO, DistillConfig(student="tiny_cnn"))
    torch.testing.assert_close(distiller.loss(built, batch, signals), F.cross_entropy(built.model(batch.x), batch.y))


def test_kd_works_with_a_torchscript_teacher_and_feature_methods_say_why_not(write_config, tmp_path):
    model = create_model("tiny_cnn_wide", num_classes=4, in_channels=1).eval()
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 1, 12, 12)), tmp_path / "t.ts")
    teacher = {"source": "torchscript", "path": "t.ts", "check_accuracy": False}
    path = write_config({"teacher": teacher, "distill": {"method": "kd", "train": {"epochs": 1}}})
    report = run_pipeline(path, until="distill", echo=lambda s: None)
    assert report["models"]["student"]["method"] == "kd"
    path = write_config({"teacher": teacher, "distill": {"method": "kd", "compare": ["fitnet"]}})
    with pytest.raises(ConfigError, match=r"teacher.source: FitNet needs the teacher's last feature map"):
        run_pipeline(path, until="distill", echo=lambda s: None)


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        ({"method": "crdd"}, r"distill.method: must be one of"),
        ({"compare": ["kd", "dkdd"]}, r"distill.compare.1: must be one of .*'dkdd'"),
        ({"compare": ["kd", "kd"]}, r"compare lists 'kd' more than once"),
        ({"kd": {"alpha": 1.5}}, r"distill.kd.alpha: must be <= 1"),
        ({"kd": {"temperature": 0}}, r"distill.kd.temperature: must be > 0"),
        ({"fitnet": {"beta": -1}}, r"distill.fitnet.beta: must be >= 0"),
        ({"fitnet": {"gamma": 1}}, r"distill.fitnet.gamma: unknown key"),
    ],
)
def test_bad_method_settings_are_one_line_errors(write_config, distill, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config({"distill": distill}))


def test_compare_trains_every_method_alike_and_reports_the_table(write_config):
    path = write_config({"distill": {"compare": ["scratch", "kd"], "train": {"epochs": 1}}})
    report = run_pipeline(path, echo=lambda s: None)
    rows = report["comparison"]
    assert [r["method"] for r in rows] == ["simkd", "scratch", "kd"]
    assert [r["deployed"] for r in rows] == [True, False, False]
    by = {r["method"]: r for r in rows}
    assert by["scratch"]["delta_vs_scratch"] == 0
    assert math.isclose(by["kd"]["delta_vs_scratch"], by["kd"]["test_top1"] - by["scratch"]["test_top1"])
    student = report["models"]["student"]
    assert by["simkd"]["test_top1"] == student["accuracy"]["top1"]  # measured as the validate stage does
    assert by["simkd"]["val_top1"] == student["val_top1"]
    assert by["simkd"]["parameters"] == student["parameters"] and by["kd"]["parameters"] == PLAIN
    assert all(r["seconds"] > 0 and r["images_per_second"] > 0 for r in rows)
    md = render_markdown(report)
    assert "| method | student test top-1 | Δ vs scratch | val top-1 (selection) | time |" in md
    assert "| scratch | " in md and "+0.00 pp" in md and "| **simkd** (deployed) |" in md
    page = render_html(report)
    assert 'alt="Distillation methods"' in page
    assert 'alt="Distillation methods"' not in render_html({**report, "comparison": None})


def test_with_cached_teacher_features_every_method_trains_from_the_cache(write_config, monkeypatch):
    def online(self, batch):
        assert not self.signals, "the teacher ran online although its signals are cached"
        return {}

    monkeypatch.setattr(OnlineTeacher, "__call__", online)
    extra = {"features": {"enabled": True, "views": 2}, "distill": {"compare": METHODS, "train": {"epochs": 1}}}
    report = run_pipeline(write_config(extra), until="distill", echo=lambda s: None)
    assert [r["method"] for r in report["comparison"]] == METHODS
    assert all(0 <= r["test_top1"] <= 1 for r in report["comparison"])


def test_a_plain_zoo_student_validates_and_exports(write_config):
    path = write_config({"distill": {"method": "fitnet", "train": {"epochs": 1}}})
    report = run_pipeline(path, until="export", echo=lambda s: None)
    student = report["models"]["student"]
    assert student["parameters"] == PLAIN and student["parameters_breakdown"] == {"student": PLAIN, "total": PLAIN}
    assert student["onnx"]["parity"]["max_abs_diff"] < 1e-4 and 0 <= student["accuracy"]["top1"] <= 1
