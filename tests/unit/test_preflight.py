"""Check before work: problems a stage would meet after hours are found before the first stage runs.

Builds untrained tiny models on a zero batch (shape tracing only); no training, no data read."""

from __future__ import annotations

import pytest
import torch
import yaml

from kdpipe import preflight as pf
from kdpipe.config import load_config
from kdpipe.diskspace import DiskFullError
from kdpipe.errors import ConfigError
from kdpipe.reporting.gates import parse_gate
from tests.conftest import TINY, deep_merge

ALL = {"teacher", "features", "distill", "validate", "export", "benchmark"}


def cfg_of(tmp_path, extra=None):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(deep_merge(TINY, extra or {})))
    return load_config(path)


def problem(tmp_path, extra=None, stale=ALL, gates=(), **kw) -> str:
    with pytest.raises(ConfigError) as info:
        pf.preflight(cfg_of(tmp_path, extra), stale, [parse_gate(g) for g in gates], **kw)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert message.endswith("(pipeline.yaml)"), message
    return message


def test_a_good_config_passes(tmp_path):
    pf.preflight(cfg_of(tmp_path, {"distill": {"compare": ["kd", "fitnet", "scratch"]}}), ALL)


def gate(**kw):
    return {"gates": [{"metric": "top1", "model": "student", "min": 0.1, **kw}]}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"benchmark": {"providers": ["NoSuchExecutionProvider"]}}, "benchmark.providers: 'NoSuchExecutionProvider'"),
        (gate(model="studnet"), "gates: gate 'studnet.top1 >= 0.1': the run will have no model 'studnet'"),
        (gate(model="student-fp16"), "no model 'student-fp16'; models: student, teacher"),
        (gate(metric="p90_ms", batch_size=8, min=None, max=5), "batch size 8 is not benchmarked"),
        (gate(metric="p90_ms", batch_size=1, threads=4, min=None, max=5), "4 threads are not benchmarked"),
        (gate(metric="agreement_with_teacher", model="teacher"), "measured for the student only"),
        (
            {**gate(metric="speedup_p50", batch_size=1), "export": {"teacher": False}},
            "speedup_p50 needs the teacher benchmarked",
        ),
        ({**gate(metric="file_bytes", model="teacher", min=None, max=1), "export": {"teacher": False}}, "not exported"),
        ({"teacher": {"feature_node": "nope"}}, "teacher.feature_node: 'nope' is not a node"),
        ({"distill": {"student_feature_node": "nope"}}, "distill.student_feature_node: 'nope' is not a node"),
        ({"distill": {"student": "resnet9000"}}, "distill.student: "),
        ({"teacher": {"arch": "resnet9000"}}, "teacher.arch: "),
        (
            {"teacher": {"source": "torchscript", "path": "t.ts"}, "distill": {"method": "simkd"}},
            "teacher.source: SimKD reuses the teacher's classifier, which cannot be cut out of a TorchScript",
        ),
        (
            {"teacher": {"source": "torchscript", "path": "t.ts"}, "distill": {"method": "kd", "compare": ["fitnet"]}},
            "teacher.source: ",
        ),
    ],
)
def test_found_before_any_stage_runs(tmp_path, extra, expected):
    assert expected in problem(tmp_path, extra)


def test_command_line_gates_and_baseline_models(tmp_path):
    assert "no model 'techer'" in problem(tmp_path, gates=["techer.top1 >= 0.5"])
    assert "baseline.models" in problem(tmp_path, {"baseline": {"models": ["student-int8"]}}, baseline=True)
    pf.preflight(
        cfg_of(tmp_path, {"export": {"variants": ["int8_static"]}}),
        ALL,
        [parse_gate("student-int8_static.top1 >= 0.1")],
    )


def test_torchscript_teacher_with_kd_passes(tmp_path):
    from kdpipe.ml.models.zoo import create_model

    model = create_model("tiny_cnn_wide", num_classes=4, in_channels=1).eval()
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 1, 12, 12)), tmp_path / "t.ts")  # it is loaded and run
    pf.preflight(
        cfg_of(tmp_path, {"teacher": {"source": "torchscript", "path": "t.ts"}, "distill": {"method": "kd"}}), ALL
    )


def test_cached_stages_and_unfinished_runs_are_not_checked(tmp_path):
    bad = {"benchmark": {"providers": ["NoSuchExecutionProvider"]}, **gate(model="nobody")}
    pf.preflight(cfg_of(tmp_path, bad), {"teacher"}, complete=False)


def test_variant_whose_converter_is_missing(tmp_path, monkeypatch):
    real = pf.importlib.util.find_spec
    monkeypatch.setattr(pf.importlib.util, "find_spec", lambda m: None if m == "onnxruntime.quantization" else real(m))
    assert "export.variants: 'int8_static' needs onnxruntime.quantization" in problem(
        tmp_path, {"export": {"variants": ["fp16", "int8_static"]}}
    )


def test_a_run_that_will_not_fit_on_the_disk(tmp_path, monkeypatch):
    import kdpipe.diskspace as ds

    monkeypatch.setattr(ds, "free_bytes", lambda path: 10_000)
    expected = (
        r"^not enough space on /\S* for this run: needs ~\d+\.\d MiB \(features \d+\.\d [KM]iB, checkpoints "
        r"\d+\.\d [KM]iB, ONNX \+ variants \d+\.\d MiB, reports 1\.0 MiB, spare 4\.0 MiB\), free 9\.8 KiB; .*cache_dir"
    )
    with pytest.raises(DiskFullError, match=expected) as info:
        pf.preflight(cfg_of(tmp_path, {"features": {"enabled": True}}), ALL)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


# the TINY pipeline with features cached: 10 views of 8,000 images, of a 32x6x6 feature map in fp32
BIG_FEATURES = {
    "data": {"synthetic": {"train_size": 8000}},
    "features": {"enabled": True, "views": 10, "precision": "fp32"},
}


def test_the_space_a_run_needs_is_what_it_writes(tmp_path, monkeypatch):
    """Sized to the run, never a fixed spare: 100 MB free holds a few-MB run, and refuses one whose features alone
    take more, naming each part; only the stale stages count."""
    import kdpipe.diskspace as ds

    monkeypatch.setattr(ds, "free_bytes", lambda path: 100 * 10**6)
    pf.preflight(cfg_of(tmp_path, {"features": {"enabled": True}}), ALL)  # a few MB
    cfg = cfg_of(tmp_path, BIG_FEATURES)
    sizing = pf.Sizing()
    pf.check_models(cfg, ALL, sizing)
    writes = {label: n for label, _, n in pf.run_writes(cfg, ALL, sizing, {})}
    images = 8000 - 800  # val_fraction 0.1
    feature = 4 * int(torch.Size(sizing.feature_shape).numel())
    assert writes["features"] == images * 10 * (feature + 4 * 4) + 8 * images + 17 * 10 * 8000
    assert 0 < writes["checkpoints"] < 10 * 2**20 and 0 < writes["ONNX + variants"] < 10 * 2**20
    expected = r"for this run: needs ~.* \(features \d+\.\d MiB, checkpoints .*\), free 95"
    with pytest.raises(DiskFullError, match=expected):
        pf.preflight(cfg, ALL)
    pf.preflight(cfg, ALL - {"features"})  # the features are cached: the rest fits


def test_an_all_cached_run_needs_no_space(tmp_path, monkeypatch):
    import kdpipe.diskspace as ds

    monkeypatch.setattr(ds, "free_bytes", lambda path: 0)
    pf.preflight(cfg_of(tmp_path, BIG_FEATURES), set())


def test_checks_leave_the_random_state_alone(tmp_path):
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    pf.preflight(cfg_of(tmp_path), ALL)
    assert torch.equal(before, torch.random.get_rng_state())


def test_folders_that_cannot_be_written(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "output_dir: " in problem(tmp_path, {"output_dir": "f"}, stale=set())


@pytest.mark.parametrize(
    ("baseline", "expected"),
    [
        ({"teacher": {}}, "the baseline report has no model 'student'"),
        ({"student": {"accuracy": {}}}, "the baseline's 'student' has no test top-1"),
        ({"student": {"accuracy": {"top1": 0.9}, "latency": {"batch_1": {"p50_ms": 1.0}}}}, "no measurement rounds"),
    ],
)
def test_a_baseline_report_that_cannot_be_compared(tmp_path, baseline, expected):
    from kdpipe.errors import UsageError

    with pytest.raises(UsageError, match=expected):
        pf.preflight(cfg_of(tmp_path), ALL, baseline={"schema_version": 1, "models": baseline})
    good = {"student": {"accuracy": {"top1": 0.9}, "latency": {"batch_1": {"round_p50_ms": [1.0, 1.1]}}}}
    pf.preflight(cfg_of(tmp_path), ALL, baseline={"schema_version": 1, "models": good})


STEMS = """
from torch import nn


def stem(channels, in_channels=None):
    return nn.Sequential(nn.Conv2d(channels, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
"""


@pytest.mark.parametrize(
    ("data", "wants", "suggested"),
    [
        ({"dataset": "fashion_mnist"}, 3, "(build the stem from in_channels)"),  # its channels are fixed
        ({"dataset": "imagefolder", "root": "photos", "channels": 1}, 3, "(set data.channels: 3 or build the stem"),
        ({"dataset": "imagefolder", "root": "photos", "channels": 1}, 4, "(build the stem from in_channels)"),
        ({"dataset": "synthetic", "synthetic": {"channels": 3}}, 1, "(set data.synthetic.channels: 1 or build"),
    ],
    ids=["fashion_mnist", "imagefolder", "imagefolder-4", "synthetic"],
)
def test_a_stem_for_other_channels_suggests_only_settings_the_dataset_has(tmp_path, data, wants, suggested):
    from tests.image_data import make_imagefolder

    make_imagefolder(tmp_path / "photos", train=2, test=1, size=12)
    (tmp_path / "models.py").write_text(STEMS)
    teacher = {"source": "python", "entrypoint": "models.py:stem", "kwargs": {"channels": wants}}
    message = problem(tmp_path, {"data": data, "teacher": teacher}, stale={"teacher"})
    have = data.get("channels") or data.get("synthetic", {}).get("channels") or 1
    channels = "1 input channel" if wants == 1 else f"{wants} input channels"
    assert message.startswith(f"teacher.entrypoint: models.py:stem expects {channels}; the data has {have}"), message
    assert suggested in message, message
