"""`kdpipe condense` end to end on the tiny synthetic dataset: the transfer set on disk, a run that trains on it,
and the bad input it refuses (one line, exit 2, nothing half-written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdpipe.cli import main
from kdpipe.config import load_config
from kdpipe.fileio import sha256_file
from kdpipe.ml.data.memory import load_dataset, make_splits
from tests.conftest import TINY, deep_merge

FAST = ["--iterations", "3", "--width", "8", "--real-batch", "8", "--no-progress"]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_one_line_exit_2(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kdpipe: error: "), err
    for name in names:
        assert name in err, err


def leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in project.iterdir() if p.name.startswith("."))


def test_condense_then_train_on_the_set(project, capsys):
    code, out, err = cli(capsys, "condense", "-c", "pipeline.yaml", "--per-class", "3", "-o", "cond", "--seed", "2",
                         *FAST)  # fmt: skip
    assert code == 0, err
    assert "condensed: cond (3 x 4 images, DM loss" in out
    folder = project / "cond"
    names = ["0_class0", "1_class1", "2_class2", "3_class3", "provenance.json"]
    assert sorted(p.name for p in folder.iterdir()) == names
    prov = json.loads((folder / "provenance.json").read_text())
    assert {k: prov[k] for k in ("method", "per_class", "iterations", "seed")} == {
        "method": "distribution_matching", "per_class": 3, "iterations": 3, "seed": 2,
    }  # fmt: skip
    assert set(prov["versions"]) == {"kdpipe", "torch"} and prov["shape"] == [1, 12, 12]
    assert prov["source"]["fingerprint"] == {"dataset": "synthetic"} and prov["source"]["split"] == "train"
    assert prov["source"]["data"]["synthetic"] == TINY["data"]["synthetic"]
    assert len(prov["files"]) == 12
    for rel, sha in prov["files"].items():
        assert sha256_file(folder / rel) == sha
    cfg = load_config(project / "pipeline.yaml")
    splits = make_splits(cfg, load_dataset(cfg))
    assert set(prov["source"]["start_indices"]) <= set(splits.train_idx.tolist())  # never a val (or test) image

    run = deep_merge(TINY, {"data": {"transfer_set": "cond", "transfer_repeats": 3, "augment": {"dsa": True}}})
    (project / "run.yaml").write_text(yaml.safe_dump(run))
    code, out, err = cli(capsys, "run", "-c", "run.yaml", "--until", "validate")
    assert code == 0, err
    report = json.loads((project / "kdpipe-out" / "report.json").read_text())
    assert report["dataset"]["train_images"] == 12
    assert report["dataset"]["val_images"] == len(splits.val_idx)  # the dataset's own val split
    assert report["dataset"]["transfer_set"]["per_class"] == [3, 3, 3, 3]
    assert report["dataset"]["transfer_set"]["provenance"]["method"] == "distribution_matching"

    image = folder / "2_class2" / "1.png"
    image.write_bytes(image.read_bytes() + b"\0")  # edited after it was made
    last_run = (project / ".kdpipe" / "last_run.json").read_text()
    code, out, err = cli(capsys, "run", "-c", "run.yaml", "--until", "validate", "--force", "teacher")
    assert_one_line_exit_2(code, err, "2_class2/1.png", "sha256 differs", "provenance.json")
    assert "running" not in out  # before any stage
    assert (project / ".kdpipe" / "last_run.json").read_text() == last_run


def test_fewer_images_than_asked_names_the_class(project, capsys):
    code, _, err = cli(capsys, "condense", "-c", "pipeline.yaml", "--per-class", "500", "-o", "cond", *FAST)
    assert_one_line_exit_2(code, err, "train split: class 'class0' has", "fewer than --per-class 500")
    assert not (project / "cond").exists() and leftovers(project) == []


def test_an_existing_folder_needs_force(project, capsys):
    (project / "cond").mkdir()
    (project / "cond" / "mine.txt").write_text("keep")
    code, _, err = cli(capsys, "condense", "-c", "pipeline.yaml", "--per-class", "2", "-o", "cond", *FAST)
    assert_one_line_exit_2(code, err, "cond: already exists", "--force")
    assert (project / "cond" / "mine.txt").read_text() == "keep"
    code, _, err = cli(capsys, "condense", "-c", "pipeline.yaml", "--per-class", "2", "-o", "cond", "--force", *FAST)
    assert code == 0, err
    assert not (project / "cond" / "mine.txt").exists() and (project / "cond" / "provenance.json").is_file()
    assert leftovers(project) == []


@pytest.mark.parametrize("where", ["optimising", "writing"])
def test_an_interrupted_condense_leaves_nothing(project, capsys, monkeypatch, where):
    from PIL import Image

    from kdpipe.ml.data import condense

    calls = []
    real_save = Image.Image.save

    def interrupt(*args, **kwargs):
        calls.append(1)
        if where == "writing" and len(calls) < 3:  # two images written, then Ctrl-C
            return real_save(*args, **kwargs)
        raise KeyboardInterrupt

    if where == "optimising":
        monkeypatch.setattr(condense.torch.optim.SGD, "step", interrupt)
    else:
        monkeypatch.setattr(Image.Image, "save", interrupt)
    code, _, _ = cli(capsys, "condense", "-c", "pipeline.yaml", "--per-class", "2", "-o", "cond", *FAST)
    assert code == 130 and calls
    assert not (project / "cond").exists() and leftovers(project) == []


def test_a_missing_transfer_set_is_named(project, capsys):
    run = deep_merge(TINY, {"data": {"transfer_set": "nowhere"}})
    (project / "run.yaml").write_text(yaml.safe_dump(run))
    code, _, err = cli(capsys, "run", "-c", "run.yaml")
    assert_one_line_exit_2(code, err, "data.transfer_set", "nowhere does not exist", "kdpipe condense")
