"""A damaged epoch checkpoint is discarded with a warning: the run resumes from the previous good one, or starts
over, and ends with the same weights as an uninterrupted run. A full disk while checkpointing is one line."""

from __future__ import annotations

import errno
import logging

import pytest
import torch

from kdpipe.config import load_config
from kdpipe.diskspace import DiskFullError
from kdpipe.ml.data.memory import load_dataset, make_splits
from kdpipe.ml.train import training
from kdpipe.ml.train.training import CHECKPOINT, PREVIOUS
from tests.stages.test_training import Killed, _fit


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: its weights and history are what every recovered run must end with."""
    import yaml

    from tests.conftest import TINY

    folder = tmp_path_factory.mktemp("straight")
    (folder / "p.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(folder / "p.yaml")
    splits = make_splits(cfg, load_dataset(cfg))
    model, result, _ = _fit(splits, cfg, folder / "work")
    return cfg, splits, model, result


def _killed_after_two_epochs(cfg, splits, work):
    with pytest.raises(Killed):
        _fit(splits, cfg, work, kill_at_step=14)  # in the third epoch (6 steps an epoch)
    assert (work / CHECKPOINT).is_file() and (work / PREVIOUS).is_file()  # epochs 2 and 1


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def scribble(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))


def other_shape(path):
    torch.save({"model": {"weight": torch.zeros(3)}, "optimizer": {}, "scheduler": {}, "rng": None, "state": {}}, path)


def foreign_model(path):
    saved = torch.load(path, weights_only=True)
    saved["model"] = {k + ".x": v for k, v in saved["model"].items()}
    torch.save(saved, path)


@pytest.mark.parametrize("damage", [truncate, scribble, other_shape, foreign_model, lambda p: p.write_bytes(b"")])
def test_damaged_last_checkpoint_resumes_from_the_previous(straight, tmp_path, caplog, damage):
    cfg, splits, model, result = straight
    work = tmp_path / "work"
    _killed_after_two_epochs(cfg, splits, work)
    damage(work / CHECKPOINT)
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        resumed, res, steps = _fit(splits, cfg, work)
    assert "discarding unreadable checkpoint" in caplog.text and str(work / CHECKPOINT) in caplog.text
    assert steps == 12  # epochs 2 and 3: resumed after epoch 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert [h["val_top1"] for h in res["history"]] == [h["val_top1"] for h in result["history"]]


def test_both_checkpoints_damaged_starts_over(straight, tmp_path, caplog):
    cfg, splits, model, result = straight
    work = tmp_path / "work"
    _killed_after_two_epochs(cfg, splits, work)
    truncate(work / CHECKPOINT)
    foreign_model(work / PREVIOUS)  # fails halfway through loading: the model must not keep half of it
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        resumed, res, steps = _fit(splits, cfg, work)
    assert "training starts over" in caplog.text
    assert steps == 18
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert res["best_epoch"] == result["best_epoch"]


def test_full_disk_while_checkpointing_is_one_line(straight, tmp_path, monkeypatch):
    cfg, splits, _, _ = straight
    real_save = torch.save

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        _fit(splits, cfg, tmp_path / "work")
    assert str(info.value).startswith(f"no space left on device writing {tmp_path / 'work' / CHECKPOINT} (needs ~")
    monkeypatch.setattr(training.torch, "save", real_save)
    assert not list((tmp_path / "work").glob("*.tmp"))  # the partial file went with the error


def test_checkpoint_that_will_not_fit_fails_before_writing(straight, tmp_path, monkeypatch):
    import kdpipe.diskspace as ds

    cfg, splits, _, _ = straight
    monkeypatch.setattr(ds, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match=r"needs ~.* free 1000 B"):
        _fit(splits, cfg, tmp_path / "work")


@pytest.mark.parametrize("moment", [1, 2, 3, 4])
def test_killed_at_every_moment_of_a_checkpoint_write(straight, tmp_path, monkeypatch, moment):
    """The second epoch's checkpoint renames the digest, then the checkpoint, puts the new one in place, writes its
    digest: a run killed after any of these resumes and ends with the uninterrupted run's weights."""
    import os

    cfg, splits, model, result = straight
    real, calls = os.replace, {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2 + moment:  # the first epoch's checkpoint made 2 renames
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        _fit(splits, cfg, tmp_path / "work")
    monkeypatch.setattr(os, "replace", real)
    resumed, res, _ = _fit(splits, cfg, tmp_path / "work")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert [h["val_top1"] for h in res["history"]] == [h["val_top1"] for h in result["history"]]
