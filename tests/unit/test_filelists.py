"""File lists of image datasets: the stable split, the one-digest fingerprint, the in_memory choice."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kdpipe.config import LoadedConfig, parse_config
from kdpipe.errors import UsageError
from kdpipe.fileio import FileDigests
from kdpipe.ml.data import filelists, sources
from tests.image_data import make_imagefolder, write_lists


def config(data: dict) -> LoadedConfig:
    return LoadedConfig(parse_config({"data": data}), None)


def test_the_val_split_hashes_each_path_so_adding_files_moves_none():
    conf = config({"dataset": "imagefolder", "root": "x", "val_fraction": 0.2}).config.data
    names = [f"train/c{i % 3}/{i}.jpg" for i in range(400)]
    small = filelists.FileList(None, np.array([n.encode() for n in names]), np.zeros(400, dtype=np.int64))  # type: ignore[arg-type]
    grown = filelists.FileList(None, np.array([n.encode() for n in names + ["train/c0/new.jpg"] * 50]), np.zeros(450))  # type: ignore[arg-type]
    _, val_a = filelists.split_train(conf, small)
    _, val_b = filelists.split_train(conf, small)
    _, val_c = filelists.split_train(conf, grown)
    assert np.array_equal(val_a, val_b) and 40 < len(val_a) < 120
    assert np.array_equal(val_a, val_c[val_c < 400])  # the old files kept their side
    reseeded = filelists.split_train(conf.model_copy(update={"seed": 1}), small)[1]
    assert not np.array_equal(val_a, reseeded)


def test_the_fingerprint_is_one_digest_that_sees_sizes_mtimes_and_content(tmp_path):
    root = make_imagefolder(tmp_path / "p", train=30, test=2, size=8)
    cfg = config({"dataset": "imagefolder", "root": str(root)})
    memo = FileDigests(tmp_path / "fp.json")
    fp = sources.dataset_fingerprint(cfg, memo)
    assert set(fp) == {"dataset", "mode", "files", "skipped", "digest"} and fp["files"] == 96
    assert len(json.dumps(fp)) < 200  # the same size at a million files
    assert sources.dataset_fingerprint(cfg, memo) == fp
    victim = root / "train" / "ant" / "0.jpg"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = sources.dataset_fingerprint(cfg, memo)
    assert touched["digest"] != fp["digest"]
    content = config({"dataset": "imagefolder", "root": str(root), "fingerprint": "content"})
    before = sources.dataset_fingerprint(content, memo)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # same bytes, other mtime: content does not care
    assert sources.dataset_fingerprint(content, memo)["digest"] == before["digest"]


def test_a_list_file_names_classes_or_labels(tmp_path):
    root = make_imagefolder(tmp_path / "p", train=2, test=1, size=8)
    for named in (False, True):
        lists = write_lists(root, named=named)
        found = filelists.filelist(
            config({"dataset": "filelist", "files": {k: str(root / v) for k, v in lists.items()}})
        )
        assert found.classes == (["class0", "class1", "class2"] if not named else ["ant", "bee", "cat"])
        assert len(found.splits["train"]) == 6 and found.splits["test"].labels.tolist() == [0, 1, 2]
    (root / "train.csv").write_text("train/ant/0.jpg,ant\ntrain/bee/0.jpg,bee\n")
    (root / "test.csv").write_text("test/ant/0.jpg,dog\n")
    with pytest.raises(UsageError, match=r"test.csv:1: class 'dog' is not in the training list"):
        filelists.filelist(
            config({"dataset": "filelist", "files": {"train": str(root / "train.csv"), "test": str(root / "test.csv")}})
        )


def test_in_memory_auto_holds_what_fits_the_budget():
    from kdpipe.ml.data.imagedata import choose_in_memory

    small = config({"dataset": "imagefolder", "root": "x", "memory_budget_mb": 100})
    assert choose_in_memory(small, 1000, (3, 64, 64))  # 12 MB
    assert not choose_in_memory(small, 5000, (3, 224, 224))  # 750 MB
    assert not choose_in_memory(config({"dataset": "imagefolder", "root": "x", "recipe": "imagenet"}), 10, (3, 8, 8))
    forced = config({"dataset": "imagefolder", "root": "x", "in_memory": True, "memory_budget_mb": 1})
    assert choose_in_memory(forced, 5000, (3, 224, 224))


def test_preflight_knows_an_image_folders_shape_without_decoding_it(tmp_path):
    from kdpipe.preflight import data_shape

    root = make_imagefolder(tmp_path / "p", train=4, test=1, size=8)
    s = data_shape(config({"dataset": "imagefolder", "root": str(root), "channels": 1}))
    assert (s.channels, s.height, s.width, s.classes, s.train_images) == (1, 8, 8, 3, 12)
    assert data_shape(config({"dataset": "imagefolder", "root": str(root), "image_size": 5})).height == 5


def test_one_run_walks_the_image_tree_once(tmp_path, monkeypatch):
    """The fingerprint, the size checks, the streaming decision and the loading share one listing per loaded
    config (a 300k-image tree walked four times costs minutes); a config loaded again walks it again."""
    from kdpipe.ml.data import imagedata

    root = make_imagefolder(tmp_path / "p", train=12, test=4, size=8)
    walks = []
    real = filelists.imagefolder
    monkeypatch.setattr(filelists, "imagefolder", lambda cfg: walks.append(1) or real(cfg))
    cfg = config({"dataset": "imagefolder", "root": str(root), "in_memory": True})
    fp = sources.dataset_fingerprint(cfg, FileDigests(tmp_path / "fp.json"))
    assert imagedata.image_shape(cfg)[:3] == (3, 8, 8)
    assert not imagedata.will_stream(cfg)
    data, _ = imagedata.open_data(cfg)
    assert len(data.test_x) == 4 * len(data.classes) and len(walks) == 1
    again = config({"dataset": "imagefolder", "root": str(root), "in_memory": True})
    assert sources.dataset_fingerprint(again, FileDigests(tmp_path / "fp.json")) == fp and len(walks) == 2
