"""Open a dataset for the stages: image datasets in memory or streamed (``data.in_memory``), the rest in memory.

``auto`` holds an image dataset in memory when its decoded size (images × C × H × W bytes) fits
``data.memory_budget_mb`` and its recipe is cifar (whose batched tensor augmentation is the fast path);
otherwise it streams. Either way the split (a stable hash of each relative path), the normalisation
(``data.normalize``, else estimated from a seeded sample of at most 1,000 training images) and the
evaluation transform are the same, so both paths see the same images.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from kdpipe.config import FILE_DATASETS, LoadedConfig
from kdpipe.errors import UsageError
from kdpipe.ml import filelists, sources
from kdpipe.ml.data import KNOWN_STATS, Dataset, Splits, load_dataset, make_splits
from kdpipe.ml.datasets import ImageFiles, ShardRows
from kdpipe.ml.loaders import BadImages, LazyImages, Loaders, StreamData, StreamSplits
from kdpipe.ml.recipes import channel_stats, eval_transform, geometry, train_transform

STATS_SAMPLE = 1000


def open_data(cfg: LoadedConfig) -> tuple[Any, Any]:
    """(data, splits) of the configured dataset: :class:`Dataset`/:class:`Splits` in memory, or
    :class:`StreamData`/:class:`StreamSplits` streamed."""
    if cfg.config.data.dataset not in FILE_DATASETS:
        data = load_dataset(cfg)
        return data, make_splits(cfg, data)
    if cfg.config.data.dataset == "webdataset":
        return _open_shards(cfg)
    return _open_files(cfg)


def decoded_bytes(n: int, shape: tuple[int, ...]) -> int:
    return n * math.prod(shape)


def choose_in_memory(cfg: LoadedConfig, images: int, shape: tuple[int, ...]) -> bool:
    """``data.in_memory`` resolved: auto holds cifar-recipe data whose decoded size fits the budget."""
    conf = cfg.config.data
    if conf.in_memory != "auto":
        return bool(conf.in_memory)
    return conf.recipe == "cifar" and decoded_bytes(images, shape) <= conf.memory_budget_mb * 2**20


def will_stream(cfg: LoadedConfig) -> bool:
    """Whether the configured dataset streams (lists the files and reads the first image's header)."""
    conf = cfg.config.data
    if conf.dataset not in FILE_DATASETS:
        return False
    if conf.dataset == "webdataset" or conf.recipe == "imagenet" or conf.in_memory is False:
        return True
    found = sources.listing(cfg)
    train = found.splits["train"]
    images = len(train) + len(found.splits["test"]) + len(found.splits.get("val", ()))
    return not choose_in_memory(cfg, images, _first_geometry(cfg, train.path(0)).shape)


def image_shape(cfg: LoadedConfig) -> tuple[int, int, int, int, int] | None:
    """(channels, height, width, classes, training images) of an image dataset from its file list and first
    image's header, without decoding pixels; None for WebDataset shards (listing them reads every shard)."""
    if cfg.config.data.dataset not in FILE_DATASETS or cfg.config.data.dataset == "webdataset":
        return None
    found = sources.listing(cfg)
    train = found.splits["train"]
    c, h, w = _first_geometry(cfg, train.path(0)).shape
    return c, h, w, len(found.classes), len(train) + len(found.splits.get("val", ()))


def _first_geometry(cfg: LoadedConfig, first: Any) -> Any:
    """The geometry the first training image implies; an unreadable one is one line naming it."""
    try:
        return geometry(cfg.config.data, first)
    except Exception as exc:
        raise UsageError(f"{first}: unreadable image ({exc})") from None


def _loaders(cfg: LoadedConfig) -> Loaders:
    runtime = cfg.config.runtime
    pin = runtime.device != "cpu" and torch.cuda.is_available()
    return Loaders(cfg.config.data.workers, pin)


def _stats(cfg: LoadedConfig, sample: Any) -> tuple[list[float], list[float], bool]:
    """(mean, std, estimated): configured, known for the dataset, else from ``sample()`` (uint8 batches)."""
    conf = cfg.config.data
    if conf.normalize:
        return list(conf.normalize.mean), list(conf.normalize.std), False
    if conf.dataset in KNOWN_STATS:
        mean, std = KNOWN_STATS[conf.dataset]
        return list(mean), list(std), False
    mean, std = channel_stats(sample())
    return mean, std, True


def _stats_rows(seed: int, train: filelists.FileList, rows: np.ndarray) -> np.ndarray:
    """A seeded choice of at most 1,000 training rows (the same on either path)."""
    if len(rows) <= STATS_SAMPLE:
        return rows
    rank = filelists.hash_fraction(seed, train.paths[rows], "stats")
    return np.sort(rows[np.argsort(rank)[:STATS_SAMPLE]])


def _decode_all(ds: ImageFiles, loaders: Loaders, bad: BadImages) -> tuple[torch.Tensor, np.ndarray]:
    """Every image of ``ds`` into one preallocated uint8 tensor (decoded by the loader workers), and which
    rows decoded. No list of per-image arrays, no second copy."""
    out = torch.empty((len(ds), *ds.geo.shape), dtype=torch.uint8)
    ok = np.ones(len(ds), dtype=bool)
    pos = 0
    for x, _, index, errors in loaders.make(ds, batch_size=256):
        keep = set(bad.check(lambda i, index=index: ds.name(int(index[i])), errors))
        ok[pos : pos + len(x)] = [i in keep for i in range(len(x))]
        out[pos : pos + len(x)] = x
        pos += len(x)
    return out, ok


def _open_files(cfg: LoadedConfig) -> tuple[Any, Any]:
    conf = cfg.config.data
    found = sources.listing(cfg)
    bad = BadImages(conf.skip_bad_images, listed=list(found.skipped))
    train, test = found.splits["train"], found.splits["test"]
    if "val" in found.splits:  # a list file of its own: train + val in one list, val at the end
        val = found.splits["val"]
        rebased = np.array([os.fsencode(os.path.relpath(val.path(i), train.root)) for i in range(len(val))])
        train_idx = np.arange(len(train))
        val_idx = np.arange(len(train), len(train) + len(val))
        paths, labels_ = np.concatenate([train.paths, rebased]), np.concatenate([train.labels, val.labels])
        train = filelists.FileList(train.root, paths, labels_)
        if conf.train_subset is not None and conf.train_subset < len(train_idx):
            rank = filelists.hash_fraction(conf.seed, train.paths[train_idx], "subset")
            train_idx = np.sort(train_idx[np.argsort(rank)[: conf.train_subset]])
    else:
        train_idx, val_idx = filelists.split_train(conf, train)
    geo = _first_geometry(cfg, train.path(0))
    loaders = _loaders(cfg)
    eval_t = eval_transform(conf, geo)
    stats_rows = _stats_rows(conf.seed, train, train_idx)
    in_memory = choose_in_memory(cfg, len(train) + len(test), geo.shape)
    labels = {"train": torch.from_numpy(train.labels), "test": torch.from_numpy(test.labels)}
    if in_memory:
        train_x, ok = _decode_all(ImageFiles(train, geo, *eval_t), loaders, bad)
        test_x, test_ok = _decode_all(ImageFiles(test, geo, *eval_t), loaders, bad)
        train_idx, val_idx = train_idx[ok[train_idx]], val_idx[ok[val_idx]]
        if not test_ok.all():
            test_x, labels["test"] = test_x[torch.from_numpy(test_ok)], labels["test"][torch.from_numpy(test_ok)]
        sample = train_x[torch.from_numpy(stats_rows)]
        mean, std, _ = _stats(cfg, lambda: sample.split(256))
        data = Dataset(conf.dataset, found.classes, train_x, labels["train"], test_x, labels["test"], mean, std)
        data.source_report = {"path": "in_memory", **bad.report()}
        return data, Splits(data, torch.from_numpy(train_idx), torch.from_numpy(val_idx))
    files = {"train": train, "test": test}
    transforms = {"eval": eval_t, "train": train_transform(conf, geo)}
    data = StreamData(conf.dataset, found.classes, geo, [0.0], [1.0], files, labels, transforms, loaders, bad)
    sample = LazyImages(data, "train", stats_rows, labels["train"][stats_rows])
    mean, std, _ = _stats(cfg, lambda: (sample[i : i + 256] for i in range(0, len(sample), 256)))
    data.mean, data.std = mean, std
    return data, StreamSplits(data, train_idx, val_idx, len(train_idx))


def _first_image(shard: Any) -> bytes:
    import tarfile

    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp", "bmp"):
                return tar.extractfile(member).read()  # type: ignore[union-attr]
    raise UsageError(f"{shard}: no image in the first training shard")


def _open_shards(cfg: LoadedConfig) -> tuple[Any, Any]:
    """WebDataset shards: listed once (keys and labels from the tar headers and .cls members), always streamed."""
    conf = cfg.config.data
    assert conf.shards is not None
    shards = {
        split: filelists.expand_shards(cfg, pattern)
        for split, pattern in (("train", conf.shards.train), ("val", conf.shards.val), ("test", conf.shards.test))
        if pattern
    }
    labels: dict[str, np.ndarray] = {}
    keys: dict[str, np.ndarray] = {}
    listed: list[tuple[Any, list[str]]] = []  # the training shards' keys, shard by shard
    for split, paths in shards.items():
        k, y = [], []
        for p in paths:
            a, b = filelists.shard_index(p)
            k += a
            y += b
            if split == "train":
                listed.append((p, a))
        keys[split], labels[split] = np.array([s.encode() for s in k]), np.array(y, dtype=np.int64)
    top = max(int(v.max()) for v in labels.values() if len(v))
    classes = list(conf.classes) if conf.classes else [f"class{i}" for i in range(top + 1)]
    if top >= len(classes) or min(int(v.min()) for v in labels.values() if len(v)) < 0:
        raise UsageError(f"{shards['train'][0]}: labels outside 0..{len(classes) - 1} (data.classes)")
    sources_: dict[str, Any] = {"test": (shards["test"], None)}
    is_val = np.zeros(len(keys["train"]), dtype=bool)
    if "val" in shards:
        sources_["train"], sources_["val"] = (shards["train"], None), (shards["val"], None)
        val_labels = labels["val"]
        train_labels = labels["train"]
    else:
        is_val = filelists.hash_fraction(conf.seed, keys["train"]) < conf.val_fraction
        sources_["train"] = (shards["train"], (conf.seed, conf.val_fraction, False))
        sources_["val"] = (shards["train"], (conf.seed, conf.val_fraction, True))
        val_labels, train_labels = labels["train"][is_val], labels["train"][~is_val]
    try:
        geo = geometry(conf, _first_image(shards["train"][0]))
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{shards['train'][0]}: unreadable first image ({exc})") from None
    bad = BadImages(conf.skip_bad_images)
    tensors = {"train": torch.from_numpy(train_labels), "test": torch.from_numpy(labels["test"]),
               "val": torch.from_numpy(val_labels)}  # fmt: skip
    transforms = {"eval": eval_transform(conf, geo), "train": train_transform(conf, geo)}
    data = StreamData(conf.dataset, classes, geo, [0.0], [1.0], sources_, tensors, transforms, _loaders(cfg), bad)
    data.shard_rows = ShardRows.of(listed, ~is_val)
    n = min(STATS_SAMPLE, len(train_labels))
    mean, std, _ = _stats(cfg, lambda: iter([data.train_x[:n]]))
    data.mean, data.std = mean, std
    return data, StreamSplits(data, None, None, len(train_labels))
