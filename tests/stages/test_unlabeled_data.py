"""Unlabelled training images on every data path: in memory and streamed, from a folder, a list file or shards;
data.labels_per_class; the teacher-only terms see them, the cross-entropy never; the teacher trains without them
and the features stage covers them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.config import DistillConfig, LoadedConfig, parse_config
from kdpipe.ml.data.imagedata import open_data
from kdpipe.ml.data.memory import Batch, Splits, labeled_part, train_batches
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.zoo import create_model
from kdpipe.runner import run_pipeline
from kdpipe.stages.distillers import DISTILLERS, DataInfo, OnlineTeacher, TeacherParts
from tests.conftest import TINY, deep_merge
from tests.image_data import make_imagefolder, write_lists, write_shards

UNLABELLED = 7


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("img") / "photos", train=10, test=3, size=20)


@pytest.fixture(scope="module")
def extra(tmp_path_factory) -> Path:
    """UNLABELLED JPEGs: four in a flat folder, three in a class-less sub-folder, all very bright (tellable)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("unl") / "more"
    rng = np.random.default_rng(1)
    for i in range(UNLABELLED):
        sub = root / ("a/b" if i >= 4 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(235, 255, (20, 20, 3), dtype=np.uint8)).save(sub / f"u{i}.jpg", quality=95)
    return root


def unlabelled_shards(source: Path, out: Path) -> str:
    """``source``'s images as two WebDataset shards without a ``cls`` member."""
    files = sorted(source.rglob("*.jpg"))
    out.mkdir(parents=True, exist_ok=True)
    for s, chunk in enumerate((files[:4], files[4:])):
        with tarfile.open(out / f"u-{s:03d}.tar", "w") as tar:
            for p in chunk:
                info = tarfile.TarInfo(f"{p.stem}.jpg")
                info.size = p.stat().st_size
                tar.addfile(info, io.BytesIO(p.read_bytes()))
    return str(out / "u-{000..001}.tar")


def config(**data) -> LoadedConfig:
    return LoadedConfig(parse_config({"data": {"image_size": 16, "workers": 0, **data}}), None)


def one_epoch(cfg: LoadedConfig, splits) -> list[Batch]:
    return list(train_batches(splits, 64, 3, 0, cfg.config.data.augment))


def check_joined(cfg: LoadedConfig) -> tuple[object, object, list[Batch]]:
    """The unlabelled images train (label -1, every one once an epoch, bright as they were made), never select."""
    data, splits = open_data(cfg)
    batches = one_epoch(cfg, splits)
    y = torch.cat([b.y for b in batches])
    assert int((y == -1).sum()) == UNLABELLED and len(y) == len(splits.train_idx)
    bright = torch.cat([b.x[~b.labeled] for b in batches])  # normalised; the labelled ones are much darker
    dark = torch.cat([b.x[b.labeled] for b in batches])
    assert bright.mean() > dark.mean() + 1
    assert (splits.val_y >= 0).all() and len(splits.val_y) > 0
    part = labeled_part(splits)
    assert (torch.cat([b.y for b in one_epoch(cfg, part)]) >= 0).all()
    assert len(part.train_idx) == len(splits.train_idx) - UNLABELLED
    return data, splits, batches


@pytest.mark.parametrize("in_memory", [True, False])
def test_an_unlabelled_folder_joins_the_training_split_in_memory_and_streamed(folder, extra, in_memory):
    cfg = config(dataset="imagefolder", root=str(folder), unlabeled=str(extra), in_memory=in_memory)
    _, splits, _ = check_joined(cfg)
    assert isinstance(splits, Splits) == in_memory


def test_both_paths_train_on_the_same_batches_with_unlabelled_images(folder, extra):
    data = {"dataset": "imagefolder", "root": str(folder), "unlabeled": str(extra)}
    _, _, mem = check_joined(config(**data, in_memory=True))
    _, _, stream = check_joined(config(**data, in_memory=False))
    for a, b in zip(mem, stream, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.y, b.y) and torch.equal(a.x, b.x)


def test_a_list_file_of_unlabelled_paths_beside_a_filelist_dataset(folder, extra, tmp_path):
    lists = write_lists(folder)
    paths = [p.relative_to(extra.parent).as_posix() for p in sorted(extra.rglob("*.jpg"))]
    (extra.parent / "unlabelled.txt").write_text("path\n" + "\n".join(paths) + "\n")
    files = {k: str(folder / v) for k, v in lists.items()}
    check_joined(config(dataset="filelist", files=files, unlabeled=str(extra.parent / "unlabelled.txt")))


def test_unlabelled_shards_beside_webdataset_shards_stream_and_have_training_rows(folder, extra, tmp_path):
    shards = write_shards(folder, tmp_path / "shards")
    cfg = config(dataset="webdataset", shards=shards, classes=["ant", "bee", "cat"],
                 unlabeled=unlabelled_shards(extra, tmp_path / "u"))  # fmt: skip
    _, splits, batches = check_joined(cfg)
    rows = torch.cat([b.index[~b.labeled] for b in batches])  # CRD's memory rows: after the labelled samples'
    assert sorted(rows.tolist()) == list(range(len(splits.train_idx) - UNLABELLED, len(splits.train_idx)))


def test_unlabelled_shards_beside_an_in_memory_dataset_are_decoded_into_it(folder, extra, tmp_path):
    cfg = config(dataset="imagefolder", root=str(folder), unlabeled=unlabelled_shards(extra, tmp_path / "u"))
    data, splits, _ = check_joined(cfg)
    assert isinstance(splits, Splits) and data.source_report["path"] == "in_memory"


def synthetic(tmp_path: Path, **data) -> LoadedConfig:
    conf = deep_merge(TINY, {"data": data})
    return LoadedConfig(parse_config(conf), tmp_path / "pipeline.yaml")


def grey_pngs(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((9, 14), 250 - i, dtype=np.uint8)).save(folder / f"{i}.png")  # resized to 12x12
    return folder


def test_labels_per_class_on_a_built_in_set_and_unlabelled_images_resized_to_it(tmp_path):
    grey_pngs(tmp_path / "u", 5)
    data, splits = open_data(synthetic(tmp_path, labels_per_class=6, unlabeled="u"))
    n = 192  # data.synthetic.train_size
    assert data.train_x.shape == (n + 5, 1, 12, 12) and (data.train_x[n:] > 200).all()
    train_y = data.train_y[splits.train_idx]
    assert torch.bincount(train_y[train_y >= 0], minlength=4).tolist() == [6, 6, 6, 6]
    assert int((train_y < 0).sum()) == len(splits.train_idx) - 24 and splits.train_idx.max() == n + 4
    assert (splits.val_y >= 0).all()
    kept = splits.train_idx[train_y >= 0]
    again = open_data(synthetic(tmp_path, labels_per_class=6, unlabeled="u"))[1]
    assert torch.equal(again.train_idx[again.data.train_y[again.train_idx] >= 0], kept)  # fixed by data.seed
    other = open_data(synthetic(tmp_path, labels_per_class=6))[1]
    assert torch.equal(other.train_idx[other.data.train_y[other.train_idx] >= 0], kept)  # unlabelled ones: no matter


# ------------------------------------------------------------------------------------------ the loss terms
INFO = DataInfo(4, (1, 12, 12), list("abcd"), torch.arange(8))
#: each method, its settings, and the same with its label-free terms weighed 0 (only the cross-entropy left)
METHODS = [
    ("kd", {}, {"kd": {"alpha": 0.0}}),
    ("fitnet", {}, {"fitnet": {"beta": 0.0}}),
    ("simkd", {}, None),  # the paper's loss: the MSE alone, which cannot be weighed off
    ("dkd", {"dkd": {"warmup": 0}}, {"dkd": {"alpha": 0.0, "beta": 0.0, "warmup": 0}}),
    ("crd", {"crd": {"negatives": 4}}, {"crd": {"negatives": 4, "beta": 0.0}}),
    ("crd_kd", {"crd": {"negatives": 4}}, {"crd": {"negatives": 4, "beta": 0.0, "kd_weight": 0.0}}),
    ("scratch", {}, {}),
]


def input_gradient(method: str, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d x) of one batch of 4 labelled and 4 unlabelled images, in eval mode (no BatchNorm batch
    statistics tie the images together)."""
    torch.manual_seed(1)
    teacher = create_model("tiny_cnn_wide", num_classes=4, in_channels=1).eval()
    parts = TeacherParts("tiny_cnn_wide", split_model(teacher, INFO.example()))
    distiller = DISTILLERS.get(method)()
    torch.manual_seed(0)
    built = distiller.build(parts, "tiny_cnn", INFO, DistillConfig(student="tiny_cnn", method=method, **settings))
    built.trainable.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 1, 12, 12, generator=g, requires_grad=True)
    batch = Batch(x, torch.tensor([0, 1, 2, 3, -1, -1, -1, -1]), torch.arange(8))
    signals = OnlineTeacher(teacher, parts.split, distiller.signals, torch.device("cpu"))(batch)
    loss = distiller.loss(built, batch, signals)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad.flatten(1).abs().sum(1)


@pytest.mark.parametrize(("method", "settings", "ce_only"), METHODS)
def test_teacher_terms_use_every_image_and_the_cross_entropy_the_labelled_ones(method, settings, ce_only):
    loss, grad = input_gradient(method, settings)
    assert torch.isfinite(loss) and (grad[:4] > 0).all()
    learns = DISTILLERS.get(method).learns_from_unlabeled()
    assert learns == (method != "scratch")
    assert bool((grad[4:] > 0).all()) == learns  # a teacher term reaches each unlabelled image
    if ce_only is not None:
        loss, grad = input_gradient(method, ce_only)
        assert torch.isfinite(loss) and (grad[:4] > 0).all() and (grad[4:] == 0).all()  # the CE: labelled only


def test_methods_without_a_teacher_train_on_the_labelled_images_only():
    assert not DISTILLERS.get("zipf_ls").learns_from_unlabeled() and not DISTILLERS.get("scratch").signals


# -------------------------------------------------------------------------------------- stages, end to end
def test_the_teacher_trains_on_labels_and_the_features_stage_covers_unlabelled_images(tmp_path):
    grey_pngs(tmp_path / "u", 6)
    conf = deep_merge(TINY, {"data": {"labels_per_class": 5, "unlabeled": "u"},
                             "features": {"enabled": True, "views": 2},
                             "distill": {"method": "kd", "compare": ["scratch"], "train": {"epochs": 1}}})  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    import yaml

    path.write_text(yaml.safe_dump(conf))
    run_pipeline(path, until="distill", echo=lambda s: None)
    cache = tmp_path / ".kdpipe"
    stages = json.loads((cache / "last_run.json").read_text())["stages"]

    def metrics(stage: str) -> dict:
        return json.loads((cache / stage / stages[stage]["key"] / "metrics.json").read_text())

    assert metrics("teacher")["data"]["train_images"] == 20  # 5 labelled images per class, 4 classes
    features = cache / "features" / stages["features"]["key"]
    index = np.load(features / "train_index.npy")
    assert json.loads((features / "features.json").read_text())["images"] == len(index)
    assert set(range(192, 198)) <= set(index.tolist())  # every unlabelled image, teacher features cached
    logits = np.load(features / "logits.npy")
    assert np.isfinite(logits).all() and np.abs(logits[np.isin(index, range(192, 198))]).sum() > 0
    distill = metrics("distill")
    assert distill["labels"] == {"labeled_images": 20, "unlabeled_images": len(index) - 20}
    assert {r["method"] for r in distill["comparison"]} == {"kd", "scratch"}
