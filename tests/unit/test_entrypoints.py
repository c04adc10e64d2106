"""User code as models: entry points parse, import, get the build arguments they accept, and fail in one line."""

from __future__ import annotations

import sys

import pytest
import torch

from kdpipe.errors import UsageError
from kdpipe.ml.models.entrypoints import (
    build_from_entrypoint,
    parse_entrypoint,
    resolve_model_name,
    source_digest,
)
from kdpipe.ml.models.zoo import create_model

MODELS_PY = """
import torch
from torch import nn

def build_teacher():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

def build_student(num_classes, in_channels=3, width=4):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))

def not_a_model():
    return 42

def broken():
    raise RuntimeError("out of ideas")
"""


@pytest.fixture
def models_py(tmp_path):
    (tmp_path / "models.py").write_text(MODELS_PY)
    return tmp_path


def test_file_entry_points_resolve_against_the_config_folder(models_py):
    ep = parse_entrypoint("models.py:build_teacher", models_py)
    assert ep.is_file and ep.target == str((models_py / "models.py").resolve()) and ep.function == "build_teacher"
    assert resolve_model_name("python:models.py:build_teacher", models_py) == f"python:{ep}"
    assert resolve_model_name("timm:resnet10t", models_py) == "timm:resnet10t"


def test_the_function_gets_the_arguments_it_takes(models_py):
    teacher = build_from_entrypoint(parse_entrypoint("models.py:build_teacher", models_py), 4, 1)
    assert teacher(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    student = create_model(
        f"python:{models_py / 'models.py'}:build_student", num_classes=3, in_channels=1, kwargs={"width": 6}
    )
    assert student(torch.zeros(2, 1, 8, 8)).shape == (2, 3) and student[0].out_channels == 6


def test_importable_modules_work_too(models_py, monkeypatch):
    pkg = models_py / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODELS_PY)
    monkeypatch.syspath_prepend(str(models_py))
    ep = parse_entrypoint("mypkg.models:build_student")
    assert not ep.is_file
    assert build_from_entrypoint(ep, 5, 1)(torch.zeros(1, 1, 8, 8)).shape == (1, 5)
    sys.modules.pop("mypkg.models", None)
    sys.modules.pop("mypkg", None)


def test_the_source_bytes_are_the_fingerprint(models_py):
    ep = parse_entrypoint("models.py:build_teacher", models_py)
    before = source_digest(ep)
    (models_py / "models.py").write_text(MODELS_PY + "\n# changed\n")
    assert source_digest(ep) != before


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("models.py", r"must look like FILE.py:FUNCTION or package.module:FUNCTION"),
        ("nope.py:f", r"file not found: .*nope.py"),
        ("models.py:missing", r"models.py has no function 'missing' \(it has: .*build_student"),
        ("models.py:not_a_model", r"returned an int, not a torch.nn.Module"),
        ("models.py:broken", r"raised RuntimeError: out of ideas"),
        ("no_such_pkg_x.models:f", r"module 'no_such_pkg_x.models' cannot be found"),
    ],
)
def test_mistakes_are_one_line(models_py, entry, message):
    with pytest.raises(UsageError, match=message) as info:
        build_from_entrypoint(parse_entrypoint(entry, models_py), 4, 1)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_an_import_error_in_user_code_is_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(UsageError, match=r"importing bad.py raised ModuleNotFoundError"):
        build_from_entrypoint(parse_entrypoint("bad.py:f", tmp_path), 4, 1)
