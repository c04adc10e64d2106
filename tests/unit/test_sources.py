"""Where Fashion-MNIST is looked for, in order, and the IDX reader (on made-up files)."""

import gzip
import struct

import numpy as np
import pytest

from kdpipe.config import load_config
from kdpipe.errors import UsageError
from kdpipe.ml.data import sources


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(folder, n_train=6, n_test=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return folder


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(sources, "default_download_root", lambda: tmp_path / "no-download")
    monkeypatch.delenv("KDPIPE_DATA", raising=False)


def config(tmp_path, text="data: {dataset: fashion_mnist, download: false}\n"):
    (tmp_path / "p.yaml").write_text(text)
    return load_config(tmp_path / "p.yaml")


def test_lookup_order_root_then_env(no_system_data, tmp_path, monkeypatch):
    env = fake_fashion(tmp_path / "env")
    monkeypatch.setenv("KDPIPE_DATA", str(env))
    assert sources.locate_fashion_mnist(config(tmp_path))["t10k-images-idx3-ubyte"].parent == env
    root = fake_fashion(tmp_path / "mine" / "FashionMNIST" / "raw")
    cfg = config(tmp_path, "data: {dataset: fashion_mnist, root: mine, download: false}\n")
    assert sources.locate_fashion_mnist(cfg)["train-images-idx3-ubyte"].parent == root


def test_missing_data_says_how_to_get_it(no_system_data, tmp_path):
    with pytest.raises(UsageError) as info:
        sources.locate_fashion_mnist(config(tmp_path))
    assert "apt-get install dataset-fashion-mnist" in str(info.value) and info.value.exit_code == 2


def test_idx_reader_and_fingerprint(no_system_data, tmp_path, monkeypatch):
    from kdpipe.fileio import FileDigests
    from kdpipe.ml.data.memory import load_dataset

    folder = fake_fashion(tmp_path / "d")
    monkeypatch.setenv("KDPIPE_DATA", str(folder))
    cfg = config(tmp_path)
    data = load_dataset(cfg)
    assert tuple(data.train_x.shape) == (6, 1, 28, 28) and data.test_y.tolist() == [0, 1, 2, 3]
    fp = sources.dataset_fingerprint(cfg, FileDigests(tmp_path / "fp.json"))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([3, 2, 1, 0]))
    assert sources.dataset_fingerprint(cfg, FileDigests(tmp_path / "fp2.json")) != fp

    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(UsageError, match="truncated or damaged IDX file"):
        load_dataset(cfg)


@pytest.mark.skipif(not sources.DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_debian():
    from kdpipe.ml.data.memory import load_dataset, make_splits

    cfg = load_config(None)
    data = load_dataset(cfg)
    assert tuple(data.train_x.shape) == (60000, 1, 28, 28) and tuple(data.test_x.shape) == (10000, 1, 28, 28)
    assert data.train_y.bincount().tolist() == [6000] * 10 and data.classes[9] == "Ankle boot"
    splits = make_splits(cfg, data)
    assert len(splits.val_idx) == 6000 and len(splits.train_idx) == 54000
