"""Damaged dataset files are bad input: one line naming the file and what is wrong with it, exit 2."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from kdpipe.config import load_config
from kdpipe.errors import UsageError
from kdpipe.ml.data.memory import load_dataset
from tests.unit.test_sources import fake_fashion

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"


def idx(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    )


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def damage_inside(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the deflate stream or the CRC no longer checks
    path.write_bytes(bytes(raw))


CASES = {
    "truncated gzip": (TRAIN_IMAGES, truncate, "truncated or damaged gzip file"),
    "damaged gzip": (TRAIN_IMAGES, damage_inside, "gzip"),
    "not gzip": (TRAIN_LABELS, lambda p: p.write_bytes(b"plain text, not gzip\n" * 4), "not a gzip file"),
    "empty file": (TRAIN_IMAGES, lambda p: p.write_bytes(b""), "not an IDX file"),
    "gzip of something else": (TRAIN_IMAGES, lambda p: p.write_bytes(gzip.compress(b"<html>404</html>")), "not an IDX"),
    "truncated IDX inside a good gzip": (
        TRAIN_IMAGES, lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-10])), "truncated",
    ),
    "images and labels swapped": (
        TRAIN_LABELS, lambda p: p.write_bytes(gzip.compress(idx(np.zeros((6, 28, 28))))), "expected 1",
    ),
    "fewer labels than images": (
        TRAIN_LABELS, lambda p: p.write_bytes(gzip.compress(idx(np.zeros(5)))), "5 labels for 6",
    ),
    "label out of range": (TRAIN_LABELS, lambda p: p.write_bytes(gzip.compress(idx(np.full(6, 12)))), "label 12"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_fashion_mnist_file_is_one_line_naming_it(tmp_path, case):
    name, damage, expected = CASES[case]
    folder = fake_fashion(tmp_path / "fm")
    damage(folder / name)
    (tmp_path / "p.yaml").write_text("data: {dataset: fashion_mnist, root: fm, download: false}\n")
    with pytest.raises(UsageError) as info:
        load_dataset(load_config(tmp_path / "p.yaml"))
    message = str(info.value)
    assert str(folder / name) in message and expected in message, message
    assert "\n" not in message and info.value.exit_code == 2


def test_damaged_cifar_folder_is_one_line(tmp_path):
    folder = tmp_path / "c" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(b"\x80\x04not a pickle")
    (tmp_path / "p.yaml").write_text("data: {dataset: cifar10, root: c, download: false}\n")
    with pytest.raises(UsageError) as info:
        load_dataset(load_config(tmp_path / "p.yaml"))
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_a_good_copy_still_loads(tmp_path):
    folder = fake_fashion(tmp_path / "fm")
    shutil.copy(folder / TRAIN_IMAGES, tmp_path / "spare.gz")
    (tmp_path / "p.yaml").write_text("data: {dataset: fashion_mnist, root: fm, download: false}\n")
    data = load_dataset(load_config(tmp_path / "p.yaml"))
    assert tuple(data.train_x.shape) == (6, 1, 28, 28) and data.train_y.tolist() == [0, 1, 2, 3, 4, 5]
