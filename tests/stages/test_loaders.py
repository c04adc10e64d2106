"""The streaming loader: batches are a pure function of (seed, epoch), whatever the workers; ranks split global
batches like the in-memory path; the imagenet recipe's shapes; in memory and streamed see the same split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.config import LoadedConfig, parse_config
from kdpipe.ml.data.datasets import EpochSampler
from kdpipe.ml.data.imagedata import open_data, will_stream
from kdpipe.ml.data.memory import Splits, steps_per_epoch, train_batches
from tests.image_data import make_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("img") / "photos", train=12, test=3, size=24)


def config(folder, **data) -> LoadedConfig:
    return LoadedConfig(parse_config({"data": {"dataset": "imagefolder", "root": str(folder), **data}}), None)


def epoch(cfg: LoadedConfig, splits, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b.x, b.index) for b in train_batches(splits, 8, 3, e, cfg.config.data.augment)]


def test_a_streamed_epoch_is_the_same_with_any_number_of_workers(folder):
    cfgs = [config(folder, image_size=16, in_memory=False, workers=w) for w in (0, 2)]
    (_, a), (_, b) = open_data(cfgs[0]), open_data(cfgs[1])
    first, again, other = epoch(cfgs[0], a, 1), epoch(cfgs[1], b, 1), epoch(cfgs[1], b, 2)
    assert len(first) == steps_per_epoch(a, 8) == len(again)
    for (x, i), (y, j) in zip(first, again, strict=True):
        assert torch.equal(i, j) and torch.equal(x, y)
    assert not torch.equal(first[0][1], other[0][1])  # another epoch, another order


def test_in_memory_and_streamed_train_on_the_same_batches(folder):
    mem = open_data(config(folder, image_size=16, in_memory=True))
    stream = open_data(config(folder, image_size=16, in_memory=False, workers=0))
    assert isinstance(mem[1], Splits) and not isinstance(stream[1], Splits)
    assert torch.equal(mem[1].val_idx, stream[1].val_idx) and mem[0].mean == stream[0].mean
    assert torch.equal(mem[0].test_x, stream[0].test_x[:])  # the same evaluation transform
    cfg = config(folder, image_size=16)
    for (x, i), (y, j) in zip(epoch(cfg, mem[1], 0), epoch(cfg, stream[1], 0), strict=True):
        assert torch.equal(i, j) and torch.equal(x, y)  # recipe cifar: the same crops and flips too


def test_ranks_take_the_in_memory_paths_share_of_each_global_batch():
    rows = np.arange(100, 150)
    whole = EpochSampler(rows, 8, seed=5)
    whole.set_epoch(2)
    order = [i for i, _ in whole]
    shares = []
    for rank in (0, 1):
        s = EpochSampler(rows, 4, seed=5, rank=rank, size=2)
        s.set_epoch(2)
        shares.append([i for i, _ in s])
    assert len(shares[0]) == len(shares[1]) == 24  # whole global batches only: every rank makes the same steps
    for k in range(6):
        glob = order[8 * k : 8 * k + 8]
        assert shares[0][4 * k : 4 * k + 4] == glob[0::2] and shares[1][4 * k : 4 * k + 4] == glob[1::2]


def test_the_imagenet_recipe_crops_to_size_and_always_streams(folder):
    cfg = config(
        folder, recipe="imagenet", image_size=16, imagenet={"crop_fraction": 0.5, "auto_augment": "randaugment"}
    )
    assert will_stream(cfg) and not will_stream(config(folder, image_size=16))
    data, splits = open_data(cfg)
    assert data.input_shape == (3, 16, 16) and tuple(data.test_x[:2].shape) == (2, 3, 16, 16)
    batch = next(iter(train_batches(splits, 8, 0, 0, cfg.config.data.augment)))
    assert tuple(batch.x.shape) == (8, 3, 16, 16) and batch.x.dtype == torch.float32


def test_grayscale_images_stay_one_channel_unless_asked(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8), 40 * i + (100 if c == "b" else 0), np.uint8)).save(
                    tmp_path / split / c / f"{i}.png"
                )
    assert open_data(config(tmp_path))[0].input_shape == (1, 8, 8)
    assert open_data(config(tmp_path, channels=3))[0].input_shape == (3, 8, 8)
