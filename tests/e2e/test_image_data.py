"""Image datasets through the CLI: an ImageFolder of JPEGs, the same images as list files and as WebDataset
shards, each the whole pipeline end to end (streamed); bad input is one line naming the file, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, deep_merge
from tests.image_data import make_imagefolder, write_lists, write_shards

KDPIPE = [sys.executable, "-c", "from kdpipe.cli import entry; entry()"]
FAST = {
    "teacher": {"train": {"epochs": 1, "batch_size": 8}},
    "distill": {"train": {"epochs": 1, "batch_size": 8}},
    "export": {"parity": {"samples": 8}, "bundle_samples": 4, "quantization": {"calibration_samples": 8}},
    "benchmark": {"batch_sizes": [1], "min_runs": 2, "max_seconds": 0.5, "rounds": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("img") / "photos")


def run(tmp_path: Path, data: dict, *args: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    config = deep_merge(deep_merge(deep_merge(TINY, FAST), {"data": data}), extra or {})
    config["data"] = {k: v for k, v in config["data"].items() if k != "synthetic"}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([*KDPIPE, "run", *args], cwd=tmp_path, capture_output=True, text=True)


def check_report(tmp_path: Path, path: str, variant: bool) -> dict:
    report = json.loads((tmp_path / "kdpipe-out" / "report.json").read_text())
    validate = json.loads(next((tmp_path / ".kdpipe").glob("validate/*/metrics.json")).read_text())
    assert validate["data"]["path"] == path and validate["student"]["samples"] == 12
    assert len(validate["student"]["confusion"]) == 3
    export = json.loads(next((tmp_path / ".kdpipe").glob("export/*/metrics.json")).read_text())
    assert export["input_shape"] == [3, 16, 16] and export["models"]["student"]["parity"]["samples"] == 8
    if variant:  # calibrated on streamed training images, re-validated on the whole streamed test split
        assert export["models"]["student-int8_static"]["accuracy"]["samples"] == 12
    return report


@pytest.mark.parametrize("form", ["imagefolder", "filelist", "webdataset"])
def test_the_whole_pipeline_streams_each_image_source(folder, tmp_path, form):
    data = {"image_size": 16, "in_memory": False, "workers": 1}
    if form == "imagefolder":
        data |= {"dataset": "imagefolder", "root": str(folder)}
    elif form == "filelist":
        lists = write_lists(folder)
        data |= {"dataset": "filelist", "files": {k: str(folder / v) for k, v in lists.items()}}
    else:
        data |= {
            "dataset": "webdataset",
            "shards": write_shards(folder, tmp_path / "shards"),
            "classes": ["ant", "bee", "cat"],
        }
    variant = form == "imagefolder"  # one form is enough for the int8 variant (the slowest part of export)
    out = run(tmp_path, data, extra={"export": {"variants": ["int8_static"] if variant else []}})
    assert out.returncode == 0, out.stderr
    check_report(tmp_path, "streaming", variant)
    last = (tmp_path / ".kdpipe" / "last_run.json").read_text()
    assert "0.jpg" not in last  # one digest of the file list, no per-file rows


def test_a_small_folder_stays_in_memory(folder, tmp_path):
    out = run(tmp_path, {"dataset": "imagefolder", "root": str(folder), "image_size": 16}, "--until", "validate")
    assert out.returncode == 0, out.stderr
    validate = json.loads(next((tmp_path / ".kdpipe").glob("validate/*/metrics.json")).read_text())
    assert validate["data"]["path"] == "in_memory"


def one_line_exit_2(out: subprocess.CompletedProcess, name: str) -> None:
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and name in out.stderr, out.stderr


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_truncated_image_is_one_line_naming_it_or_skipped(tmp_path, in_memory):
    root = make_imagefolder(tmp_path / "photos", train=6, test=2)
    bad = root / "train" / "bee" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "in_memory": in_memory, "workers": 1}
    one_line_exit_2(run(tmp_path, data, "--until", "teacher"), str(bad))
    out = run(tmp_path, {**data, "skip_bad_images": True}, "--until", "validate")
    assert out.returncode == 0, out.stderr
    validate = json.loads(next((tmp_path / ".kdpipe").glob("validate/*/metrics.json")).read_text())
    if in_memory:  # decoded up front: known at once; streamed: known once its batch was read
        assert validate["data"]["skipped_images"] == 1


def test_an_empty_class_folder_a_missing_list_row_and_a_non_tar_shard(tmp_path):
    root = make_imagefolder(tmp_path / "photos", train=4, test=2)
    (root / "train" / "dog").mkdir()
    one_line_exit_2(run(tmp_path, {"dataset": "imagefolder", "root": str(root)}), str(root / "train" / "dog"))

    lists = write_lists(root, named=True)
    with open(root / "train.csv", "a") as f:
        f.write("train/ant/missing.jpg,ant\n")
    files = {k: str(root / v) for k, v in lists.items()}
    one_line_exit_2(run(tmp_path, {"dataset": "filelist", "files": files}), "missing.jpg")

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "train-000.tar").write_text("not a tar")
    shards = {"train": str(tmp_path / "s" / "train-000.tar"), "test": str(tmp_path / "s" / "train-000.tar")}
    one_line_exit_2(run(tmp_path, {"dataset": "webdataset", "shards": shards}), "train-000.tar")


def test_streamed_data_parallel_training_from_the_cli(folder, tmp_path):
    """Two forked ranks each read their share of every global batch through their own loader workers."""
    data = {"dataset": "imagefolder", "root": str(folder), "image_size": 16, "in_memory": False, "workers": 1}
    out = run(tmp_path, data, "--nproc", "2", "--until", "distill")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("done") == 3


def test_cached_features_on_streamed_data_are_refused_before_any_stage(folder, tmp_path):
    data = {"dataset": "imagefolder", "root": str(folder), "image_size": 16, "in_memory": False}
    out = run(tmp_path, data, extra={"features": {"enabled": True}})
    one_line_exit_2(out, "features.enabled")
    assert "running" not in out.stdout
