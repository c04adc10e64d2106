"""Bad unlabelled input through the CLI: one line on stderr, exit 2, the key or file named, no stage run and nothing
committed; a damaged unlabelled image stops the run naming it, or is skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import TINY, deep_merge
from tests.e2e.test_bad_input import assert_one_line_exit_2, assert_refused_before_any_stage, run_cli
from tests.image_data import make_imagefolder


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(project: Path, data: dict, extra: dict | None = None) -> None:
    conf = deep_merge(deep_merge(TINY, {"data": data}), extra or {})
    (project / "pipeline.yaml").write_text(yaml.safe_dump(conf))


def pngs(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((12, 12), 9 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"unlabeled": "nowhere"}, ("data.unlabeled", "nowhere does not exist")),
        ({"unlabeled": "empty"}, ("data.unlabeled", "no images under")),
        ({"labels_per_class": 60}, ("data.labels_per_class", "60 labels per class", "training images")),
        ({"unlabeled": "u-{000..001}.tar"}, ("data.unlabeled", "u-000.tar: shard not found")),
    ],
)
def test_bad_unlabelled_input_is_refused_before_any_stage(project, capsys, monkeypatch, data, names):
    (project / "empty" / "sub").mkdir(parents=True)
    write(project, data)
    assert_refused_before_any_stage(project, capsys, monkeypatch, *names)


def test_a_test_image_given_as_unlabelled_is_refused_before_any_stage(project, capsys, monkeypatch):
    make_imagefolder(project / "photos", train=4, test=2)
    write(project, {"dataset": "imagefolder", "root": "photos", "image_size": 16, "unlabeled": "photos/test"})
    assert_refused_before_any_stage(project, capsys, monkeypatch, "data.unlabeled", "is a validation or test image")


def test_shards_beside_a_streamed_file_list_are_refused_before_any_stage(project, capsys, monkeypatch):
    from tests.stages.test_unlabeled_data import unlabelled_shards

    make_imagefolder(project / "photos", train=4, test=2)
    pattern = unlabelled_shards(project / "photos" / "train", project / "u")
    write(project, {"dataset": "imagefolder", "root": "photos", "in_memory": False, "unlabeled": pattern})
    assert_refused_before_any_stage(project, capsys, monkeypatch, "data.unlabeled", "give the unlabelled images")


def test_a_damaged_unlabelled_image_is_one_line_naming_it_or_skipped_and_counted(project, capsys):
    bad = pngs(project / "u", 4) / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    write(project, {"unlabeled": "u"})
    code, err = run_cli(capsys, "run", "--until", "teacher")
    assert_one_line_exit_2(code, err, str(bad), "skip_bad_images")
    assert not [p for p in (project / ".kdpipe").glob("*/*") if not p.name.startswith(".")]  # nothing committed
    write(project, {"unlabeled": "u", "skip_bad_images": True}, {"distill": {"method": "kd", "train": {"epochs": 1}}})
    code, err = run_cli(capsys, "run", "--until", "distill")
    assert code == 0, err
    cache = project / ".kdpipe"
    key = json.loads((cache / "last_run.json").read_text())["stages"]["distill"]["key"]
    metrics = json.loads((cache / "distill" / key / "metrics.json").read_text())
    assert metrics["data"]["skipped_images"] == 1 and metrics["data"]["unlabeled_images"] == 3
    assert metrics["labels"]["unlabeled_images"] == 3
