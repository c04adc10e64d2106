"""Unlabelled training images (data.unlabeled) and label scarcity (data.labels_per_class): the config, the listing
and fingerprint of every source, the seeded class-balanced choice of labels, and the one helper every loss term that
needs a label goes through."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.config import LoadedConfig, parse_config
from kdpipe.errors import ConfigError, UsageError
from kdpipe.fileio import FileDigests
from kdpipe.ml.data import unlabeled
from kdpipe.ml.data.memory import Batch
from kdpipe.ml.data.sources import dataset_fingerprint
from kdpipe.stages.distillers.base import labeled_ce
from kdpipe.stages.distillers.dkd import dkd_loss
from kdpipe.stages.distillers.kd import kd_loss

SYNTHETIC = {"dataset": "synthetic"}


def loaded(tmp_path: Path, **data: object) -> LoadedConfig:
    return LoadedConfig(parse_config({"data": {**SYNTHETIC, **data}}), tmp_path / "pipeline.yaml")


def pngs(folder: Path, n: int, sub: str = "") -> Path:
    from PIL import Image

    (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((12, 12), 10 * i, dtype=np.uint8)).save(folder / sub / f"{i}.png")
    return folder


def shard(path: Path, n: int, cls: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            from PIL import Image

            Image.fromarray(np.full((12, 12), i, dtype=np.uint8)).save(buf, format="PNG")
            members = [(f"k{i}.png", buf.getvalue())] + ([(f"k{i}.cls", b"1")] if cls else [])
            for name, raw in members:
                info = tarfile.TarInfo(name)
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return path


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ({"labels_per_class": 0}, {}, "data.labels_per_class: must be >= 1"),
        ({"unlabeled": " "}, {}, "data.unlabeled: an empty path"),
        ({"dataset": "webdataset", "shards": {"train": "a.tar", "test": "b.tar"}, "labels_per_class": 5}, {},
         "labels_per_class cannot drop labels from WebDataset shards"),
        ({"dataset": "webdataset", "shards": {"train": "a.tar", "test": "b.tar"}, "unlabeled": "photos"}, {},
         "give the unlabeled images as WebDataset shards too"),
        ({"unlabeled": "photos", "transfer_set": "condensed"}, {}, "drop one"),
        ({"labels_per_class": 10, "transfer_set": "condensed"}, {}, "drop one"),
        ({"unlabeled": "photos"}, {"distill": {"data": "synthetic"}}, "data.unlabeled: distill.data: synthetic"),
    ],
)  # fmt: skip
def test_combinations_that_cannot_work_are_refused_in_one_line(data, extra, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"data": {**SYNTHETIC, **data}, **extra}, "pipeline.yaml")
    assert message in str(err.value) and "pipeline.yaml" in str(err.value)


def test_unset_keys_leave_the_data_section_and_every_cache_key_as_they_were(tmp_path):
    assert "unlabeled" not in loaded(tmp_path).section("data")
    assert "labels_per_class" not in loaded(tmp_path).section("data")
    assert loaded(tmp_path, labels_per_class=3).section("data")["labels_per_class"] == 3


# ----------------------------------------------------------------------------------------------- the sources
def test_a_folder_is_every_image_under_it_class_folders_or_not(tmp_path):
    pngs(tmp_path / "u", 3)
    pngs(tmp_path / "u", 2, sub="deeper/still")
    (tmp_path / "u" / "notes.txt").write_text("not an image")
    found = unlabeled.listing(loaded(tmp_path, unlabeled="u"))
    assert found is not None and len(found) == 5 and not found.streams_as_shards
    assert "deeper/still/1.png" in found.paths
    files = found.file_list()
    assert (files.labels == unlabeled.UNLABELED).all() and files.path(0).is_file()


def test_a_list_file_of_paths_relative_to_it_with_an_optional_header(tmp_path):
    pngs(tmp_path / "imgs", 3)
    (tmp_path / "list.txt").write_text("path\nimgs/0.png\n\n# a comment\nimgs/2.png,ignored\n")
    found = unlabeled.listing(loaded(tmp_path, unlabeled="list.txt"))
    assert found is not None and found.paths == ["imgs/0.png", "imgs/2.png"]


def test_a_missing_listed_file_is_one_line_or_skipped_and_counted(tmp_path):
    pngs(tmp_path / "imgs", 2)
    (tmp_path / "list.txt").write_text("imgs/0.png\nimgs/gone.png\n")
    with pytest.raises(UsageError, match=r"list.txt:2: .*gone.png does not exist; .*skip_bad_images"):
        unlabeled.listing(loaded(tmp_path, unlabeled="list.txt"))
    found = unlabeled.listing(loaded(tmp_path, unlabeled="list.txt", skip_bad_images=True))
    assert found is not None and found.paths == ["imgs/0.png"] and len(found.skipped) == 1


def test_shards_without_a_class_field(tmp_path):
    shard(tmp_path / "s" / "u-000.tar", 3)
    shard(tmp_path / "s" / "u-001.tar", 2, cls=True)  # a label in an unlabelled shard is ignored
    found = unlabeled.listing(loaded(tmp_path, unlabeled="s/u-{000..001}.tar"))
    assert found is not None and found.streams_as_shards and len(found) == 5


@pytest.mark.parametrize(
    ("make", "value", "message"),
    [
        (lambda p: None, "nowhere", "nowhere does not exist"),
        (lambda p: (p / "empty" / "sub").mkdir(parents=True), "empty", "no images under"),
        (lambda p: pngs(p / "one", 1), "one/0.png", "is one image"),
        (lambda p: (p / "list.txt").write_text("# nothing\n"), "list.txt", "no images listed"),
        (lambda p: None, "s/u-{000..001}.tar", "u-000.tar: shard not found"),
    ],
)
def test_a_source_that_is_not_there_or_holds_no_images_is_one_line_naming_it(tmp_path, make, value, message):
    make(tmp_path)
    with pytest.raises(ConfigError) as err:
        unlabeled.listing(loaded(tmp_path, unlabeled=value))
    assert str(err.value).startswith("data.unlabeled: ") and message in str(err.value)


def test_the_fingerprint_follows_the_unlabelled_files(tmp_path):
    pngs(tmp_path / "u", 3)
    memo = FileDigests(tmp_path / "digests.json")
    assert "unlabeled" not in dataset_fingerprint(loaded(tmp_path), memo)
    first = dataset_fingerprint(loaded(tmp_path, unlabeled="u"), memo)["unlabeled"]
    assert first["files"] == 3
    pngs(tmp_path / "u", 4)  # one more image
    assert dataset_fingerprint(loaded(tmp_path, unlabeled="u"), memo)["unlabeled"]["digest"] != first["digest"]


# ---------------------------------------------------------------------------------------- labels per class
def test_labels_per_class_keeps_a_seeded_class_balanced_choice_of_the_training_rows():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    rows = np.sort(rng.choice(400, 300, replace=False))  # the training split (the rest: val)
    keep = unlabeled.keep_labels(labels, rows, 7, 0, list("abcd"), "p.yaml")
    assert np.isin(keep, rows).all() and len(np.unique(keep)) == len(keep)
    assert np.bincount(labels[keep], minlength=4).tolist() == [7, 7, 7, 7]
    assert np.array_equal(keep, unlabeled.keep_labels(labels, rows, 7, 0, list("abcd"), "p.yaml"))  # seed-fixed
    assert not np.array_equal(keep, unlabeled.keep_labels(labels, rows, 7, 1, list("abcd"), "p.yaml"))
    out = unlabeled.without_labels(labels, rows, keep)
    assert (out[keep] == labels[keep]).all() and (out[np.setdiff1d(rows, keep)] == -1).all()
    held_out = np.setdiff1d(np.arange(400), rows)
    assert (out[held_out] == labels[held_out]).all()  # the val split keeps every label


def test_more_labels_per_class_than_a_class_has_is_one_line_naming_the_class():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ConfigError) as err:
        unlabeled.keep_labels(labels, np.arange(13), 5, 0, ["cat", "dog"], "p.yaml")
    assert str(err.value) == (
        "data.labels_per_class: 5 labels per class, but class 'dog' has 3 training images (after the val split); "
        "lower it (p.yaml)"
    )


# ------------------------------------------------------------------------------------ the label-needing terms
def test_a_batch_says_which_images_have_labels():
    batch = Batch(torch.zeros(3, 1, 2, 2), torch.tensor([2, -1, 0]), torch.arange(3))
    assert batch.labeled.tolist() == [True, False, True]


def test_the_cross_entropy_reads_the_labelled_images_only_and_none_gives_zero_not_nan():
    logits = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([1, -1, 3, -1, 0])
    loss = labeled_ce(logits, labels, 0.1)
    part = F.cross_entropy(logits[[0, 2, 4]], labels[[0, 2, 4]], label_smoothing=0.1)
    torch.testing.assert_close(loss, part)
    loss.backward()
    assert (logits.grad[[1, 3]] == 0).all() and (logits.grad[[0, 2, 4]] != 0).any()
    torch.testing.assert_close(labeled_ce(logits, labels.clamp_min(0)), F.cross_entropy(logits, labels.clamp_min(0)))
    none = labeled_ce(logits, torch.full((5,), -1))
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_kd_soft_term_sees_every_image_its_cross_entropy_only_the_labelled(alpha):
    student, teacher = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    labels = torch.tensor([0, -1, 2, -1])
    loss = kd_loss(student, teacher, labels, 4.0, alpha)
    assert torch.isfinite(loss)
    loss.backward()
    unlabelled = student.grad[[1, 3]]
    assert (unlabelled != 0).any() == (alpha > 0)  # only the soft term reaches an unlabelled image


def test_dkd_takes_the_teachers_class_as_an_unlabelled_images_target():
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    labels = torch.tensor([1, -1, -1])
    as_teacher = torch.where(labels >= 0, labels, teacher.argmax(1))
    mixed = dkd_loss(student, teacher, labels, 4.0, 1.0, 8.0)
    terms = dkd_loss(student, teacher, as_teacher, 4.0, 1.0, 8.0) - F.cross_entropy(student, as_teacher)
    torch.testing.assert_close(mixed, terms + F.cross_entropy(student[:1], labels[:1]))
