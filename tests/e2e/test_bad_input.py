"""The CLI on bad input that is caught before any stage runs: one line on stderr, exit 2, the key or file named,
and nothing written (no cache folder, no output folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdpipe.cli import main
from tests.conftest import TINY


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_one_line_exit_2(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kdpipe: error: "), err
    for name in names:
        assert name in err, err


def assert_nothing_written(project: Path) -> None:
    assert not (project / ".kdpipe").exists()
    assert not (project / "kdpipe-out").exists()


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("data: {dataset: synthetic}\ndata: {dataset: synthetic}\n", ("data: duplicated key", "lines 1 and 2")),
        (b"distill: {student: r\xe9snet8}\n", ("not UTF-8", "pipeline.yaml")),
        ("data: {dataset: fashion_mnist, root: nowhere}\n", ("data.root", "nowhere does not exist")),
        ("cache_dir: afile\n", ("cache_dir", "is a file")),
        ("output_dir: afile/out\n", ("output_dir", "cannot be created")),
    ],
)
def test_bad_config_before_any_work(project, capsys, text, names):
    (project / "afile").write_text("not a folder")
    config = project / "pipeline.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run_cli(capsys, "run", "-c", str(config))
    assert_one_line_exit_2(code, err, *names)
    assert_nothing_written(project)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("distill.train.epochs=[1,", ("--set distill.train.epochs", "not valid YAML")),
        ("distill.train=3", ("distill.train", "mapping")),
        ("nokey", ("--set 'nokey'",)),
        ("cache_dir=afile", ("cache_dir", "is a file")),
    ],
)
@pytest.mark.parametrize("command", ["run", "status"])
def test_bad_set_values(project, capsys, override, names, command):
    (project / "afile").write_text("not a folder")
    code, err = run_cli(capsys, command, "-c", "pipeline.yaml", "--set", override)
    assert_one_line_exit_2(code, err, *names)
    assert_nothing_written(project)


def test_clean_with_cache_dir_that_is_a_file(project, capsys):
    (project / "afile").write_text("x")
    code, err = run_cli(capsys, "clean", "-c", "pipeline.yaml", "--set", "cache_dir=afile")
    assert_one_line_exit_2(code, err, "cache_dir")
    assert (project / "afile").read_text() == "x"


def test_library_warnings_stay_out_of_one_line_errors(project, capsys, monkeypatch):
    import warnings

    from kdpipe.errors import UsageError
    from kdpipe.stages import STAGES

    def noisy(self, ctx):
        warnings.warn_explicit(
            "torch.jit.script is deprecated", DeprecationWarning, "torch/jit/_script.py", 1, "torch.jit"
        )
        warnings.warn_explicit("Detected pickle protocol 4", UserWarning, "torch/_unpickler.py", 1, "torch._unpickler")
        raise UsageError("teacher.path: bad.pt is damaged")

    monkeypatch.setattr(STAGES.get("teacher"), "run", noisy)
    with warnings.catch_warnings(record=True) as shown:  # what would reach the terminal
        warnings.simplefilter("always")
        code, err = run_cli(capsys, "run", "--until", "teacher")
    assert_one_line_exit_2(code, err, "teacher.path")
    assert [str(w.message) for w in shown] == []


def test_truncated_dataset_file_through_the_cli(project, capsys):
    from tests.unit.test_sources import fake_fashion

    folder = fake_fashion(project / "fm")
    images = folder / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-20])
    (project / "pipeline.yaml").write_text(
        yaml.safe_dump({**TINY, "data": {"dataset": "fashion_mnist", "root": "fm", "download": False}})
    )
    code, err = run_cli(capsys, "run")
    assert_one_line_exit_2(code, err, str(images), "truncated")
    assert not [p for p in (project / ".kdpipe").glob("*/*") if not p.name.startswith(".")]  # no entry committed
    assert not (project / "kdpipe-out").exists()


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"benchmark": {"providers": ["NoSuchExecutionProvider"]}}, ("benchmark.providers",)),
        ({"gates": [{"metric": "top1", "model": "studnet", "min": 0.5}]}, ("gates", "studnet")),
        ({"teacher": {"feature_node": "nope"}}, ("teacher.feature_node", "'nope'")),
    ],
)
def test_problems_found_before_the_first_stage(project, capsys, monkeypatch, extra, names):
    from tests.conftest import deep_merge

    (project / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, extra)))
    assert_refused_before_any_stage(project, capsys, monkeypatch, *names)


def assert_refused_before_any_stage(project: Path, capsys, monkeypatch, *names: str) -> None:
    """``kdpipe run`` exits 2 with one line naming ``names``; no stage ran and nothing is in the cache."""
    from kdpipe.stages import STAGES

    ran = []
    for name in STAGES:
        monkeypatch.setattr(STAGES.get(name), "run", lambda self, ctx, _n=name: ran.append(_n))
    code, err = run_cli(capsys, "run")
    assert_one_line_exit_2(code, err, *names)
    assert ran == []
    assert not [p for p in (project / ".kdpipe").glob("*/*") if not p.name.startswith(".")]
    assert not (project / "kdpipe-out").exists()


USER_MODELS = """
from torch import nn


def head(width, classes):
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]


def rgb_stem():  # the issue's teacher: a stem hard-coded for RGB, no arguments taken
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), *head(16, 4))


def ten_classes(in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3), nn.ReLU(), *head(16, 10))


def no_pool(in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3), nn.ReLU(), nn.Conv2d(16, num_classes, 1))


def raises(num_classes):
    raise ValueError("width must be even")


def not_a_model():
    return 42
"""
PY = {"source": "python"}


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (
            {"teacher": {**PY, "entrypoint": "models.py:rgb_stem"}},
            ("teacher.entrypoint: models.py:rgb_stem expects 3 input channels; the data has 1",
             "set data.synthetic.channels: 3", "take in_channels and build the stem from it"),
        ),
        (
            {"distill": {"student": "python:models.py:rgb_stem"}},
            ("distill.student: models.py:rgb_stem expects 3 input channels; the data has 1",),
        ),
        (
            {"teacher": {**PY, "entrypoint": "models.py:ten_classes"}},
            ("teacher.entrypoint: models.py:ten_classes gives 10 logits per image; the data has 4 classes",),
        ),
        (
            {"distill": {"student": "python:models.py:no_pool", "method": "kd"}},
            ("distill.student: models.py:no_pool gives outputs of shape (2, 4, 10, 10)", "not (2, 4) class logits"),
        ),
        (
            {"teacher": {**PY, "entrypoint": "models.py:raises"}},
            ("teacher.entrypoint: models.py:raises(num_classes=4) raised ValueError: width must be even",),
        ),
        (
            {"teacher": {**PY, "entrypoint": "models.py:not_a_model"}},
            ("teacher.entrypoint: models.py:not_a_model() returned an int, not a torch.nn.Module",),
        ),
        (
            {"teacher": {**PY, "entrypoint": "syntax_error.py:build"}},
            ("teacher.entrypoint: entry point 'syntax_error.py:build': importing syntax_error.py raised SyntaxError",),
        ),
        (
            {"distill": {"student": "python:import_error.py:build"}},
            ("distill.student: entry point 'import_error.py:build'", "No module named 'not_installed_anywhere'"),
        ),
        (
            {"teacher": {"arch": "timm:test_vit", "kwargs": {"patch_size": 5}}},
            ("teacher.arch: timm:test_vit fails on a zero batch of 1×12×12 images", "divisible by patch size (5)"),
        ),
        (
            {"distill": {"student": "timm:resnet10t", "student_kwargs": {"in_chans": 3}}},
            ("distill.student: timm:resnet10t: 'in_chans' comes from the data (1)",),
        ),
    ],
    ids=["teacher-stem", "student-stem", "classes", "output-shape", "raises", "not-a-module", "syntax", "import",
         "timm-patch", "timm-in-chans"],
)  # fmt: skip
def test_user_models_that_cannot_take_the_data(project, capsys, monkeypatch, extra, names):
    from tests.conftest import deep_merge

    (project / "models.py").write_text(USER_MODELS)
    (project / "syntax_error.py").write_text("def build(:\n    pass\n")
    (project / "import_error.py").write_text("import not_installed_anywhere\n")
    (project / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, extra)))
    assert_refused_before_any_stage(project, capsys, monkeypatch, *names)


@pytest.mark.parametrize(
    ("teacher", "names"),
    [
        (
            {"source": "checkpoint", "path": "ten.pt"},
            ("teacher.path: ten.pt (tiny_cnn_wide) holds a classifier for 10 classes", "the data has 4 classes"),
        ),
        (
            {"source": "checkpoint", "path": "rgb.pt"},
            ("teacher.path: rgb.pt (tiny_cnn_wide) was trained on 3-channel images", "the data has 1"),
        ),
        ({"source": "torchscript", "path": "ten.ts"}, ("teacher.path: ten.ts gives 10 logits per image",)),
        ({"source": "torchscript", "path": "rgb.ts"}, ("teacher.path: rgb.ts expects 3 input channels",)),
    ],
    ids=["checkpoint-classes", "checkpoint-stem", "torchscript-classes", "torchscript-stem"],
)
def test_a_loaded_teacher_made_for_other_data(project, capsys, monkeypatch, teacher, names):
    import torch

    from kdpipe.ml.models.zoo import create_model
    from tests.conftest import deep_merge

    for name, classes, channels in (("ten", 10, 1), ("rgb", 4, 3)):
        model = create_model("tiny_cnn_wide", num_classes=classes, in_channels=channels).eval()
        torch.save(model.state_dict(), project / f"{name}.pt")
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, channels, 12, 12)), project / f"{name}.ts")
    distill = {"method": "kd"}  # SimKD refuses a TorchScript teacher for its own reason
    (project / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, {"teacher": teacher, "distill": distill})))
    assert_refused_before_any_stage(project, capsys, monkeypatch, *names)


def test_where_only_the_data_tells_the_shape_the_teacher_stage_refuses_before_training(project, capsys, monkeypatch):
    from kdpipe import preflight
    from kdpipe.stages import STAGES

    trained = []
    monkeypatch.setattr(preflight, "data_shape", lambda cfg: None)  # as for WebDataset shards
    monkeypatch.setattr(STAGES.get("teacher"), "train", lambda self, ctx, model: trained.append(model))
    (project / "models.py").write_text(USER_MODELS)
    (project / "pipeline.yaml").write_text(
        yaml.safe_dump({**TINY, "teacher": {**PY, "entrypoint": "models.py:rgb_stem"}})
    )
    code, err = run_cli(capsys, "run")
    assert_one_line_exit_2(code, err, "teacher.entrypoint: models.py:rgb_stem expects 3 input channels")
    assert trained == []
    assert not [p for p in (project / ".kdpipe" / "teacher").glob("*") if not p.name.startswith(".")]


def test_where_only_the_data_tells_the_shape_the_distill_stage_refuses_the_student_before_training(
    project, capsys, monkeypatch
):
    from kdpipe import preflight
    from kdpipe.stages.distill import train_method

    trained = []
    monkeypatch.setattr(preflight, "data_shape", lambda cfg: None)  # as for WebDataset shards
    monkeypatch.setattr(
        "kdpipe.stages.distill.train_method", lambda *a, **k: trained.append(a) or train_method(*a, **k)
    )
    (project / "models.py").write_text(USER_MODELS)
    (project / "pipeline.yaml").write_text(
        yaml.safe_dump({**TINY, "distill": {**TINY.get("distill", {}), "student": "python:models.py:rgb_stem"}})
    )
    code, err = run_cli(capsys, "run")
    assert_one_line_exit_2(code, err, "distill.student: models.py:rgb_stem expects 3 input channels")
    assert trained == []
    assert not [p for p in (project / ".kdpipe" / "distill").glob("*") if not p.name.startswith(".")]


def test_command_line_gate_naming_an_unknown_model(project, capsys):
    code, err = run_cli(capsys, "run", "--gate", "techer.top1 >= 0.5")
    assert_one_line_exit_2(code, err, "techer")


def _png(path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(path)


PNG_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "zero bytes": lambda p: p.write_bytes(b""),
    "not an image": lambda p: p.write_bytes(b"<html>404 not found</html>\n"),
    "damaged pixels": lambda p: p.write_bytes(p.read_bytes()[:40] + b"\x00" * 20 + p.read_bytes()[60:]),
}


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("damage", sorted(PNG_DAMAGE))
def test_corrupt_png_in_an_image_folder(project, capsys, damage, in_memory):
    from tests.image_data import make_imagefolder

    root = make_imagefolder(project / "photos", train=4, test=2, size=16)
    bad = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "x.png"
    _png(bad)
    PNG_DAMAGE[damage](bad)
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "in_memory": in_memory, "workers": 1}
    (project / "pipeline.yaml").write_text(yaml.safe_dump({**TINY, "data": data}))
    code, err = run_cli(capsys, "run", "--until", "teacher")
    assert_one_line_exit_2(code, err, str(bad))
    assert not [p for p in (project / ".kdpipe").glob("*/*") if not p.name.startswith(".")]  # no entry committed


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("output_dir=.", "holds the config's own folder"),
        ("output_dir=..", "holds the config's own folder"),
        ("output_dir=.kdpipe", "overlaps cache_dir"),
        ("output_dir=.kdpipe/out", "overlaps cache_dir"),
        ("cache_dir=kdpipe-out/cache", "overlaps cache_dir"),
    ],
)
@pytest.mark.parametrize("command", ["run", "clean"])
def test_output_dir_that_clean_would_wipe_with_the_project(project, capsys, override, expected, command):
    code, err = run_cli(capsys, command, "--set", override)
    assert_one_line_exit_2(code, err, "output_dir", expected)
    assert (project / "pipeline.yaml").is_file()
