"""Open a dataset for the stages: image datasets in memory or streamed (``data.in_memory``), the rest in memory.

``auto`` holds an image dataset in memory when its decoded size (images × C × H × W bytes) fits
``data.memory_budget_mb`` and its recipe is cifar (whose batched tensor augmentation is the fast path);
otherwise it streams. Either way the split (a stable hash of each relative path), the normalisation
(``data.normalize``, else estimated from a seeded sample of at most 1,000 training images) and the
evaluation transform are the same, so both paths see the same images.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np
import torch

from kdpipe.config import FILE_DATASETS, LoadedConfig
from kdpipe.errors import ConfigError, UsageError
from kdpipe.ml.data import filelists, sources, unlabeled
from kdpipe.ml.data.datasets import ImageFiles, ShardImages, ShardRows
from kdpipe.ml.data.loaders import BadImages, LazyImages, Loaders, StreamData, StreamSplits
from kdpipe.ml.data.memory import KNOWN_STATS, Dataset, Splits, load_dataset, make_splits
from kdpipe.ml.data.recipes import Geometry, channel_stats, eval_transform, geometry, train_transform

STATS_SAMPLE = 1000
SHARDS_BESIDE_FILES = (
    "WebDataset shards stream as shards, and this image dataset streams as files; give the unlabelled images as a "
    "folder or list file"
)


def open_data(cfg: LoadedConfig) -> tuple[Any, Any]:
    """(data, splits) of the configured dataset: :class:`Dataset`/:class:`Splits` in memory, or
    :class:`StreamData`/:class:`StreamSplits` streamed; with ``data.transfer_set``, its images are the training
    split (:func:`kdpipe.ml.data.transfer_splits.use_transfer_set`)."""
    data, splits = _open_data(cfg)
    if cfg.config.data.augment.dsa and not isinstance(data.train_x, torch.Tensor):
        raise ConfigError(
            "data.augment.dsa",
            "transforms batches held in memory, and this dataset streams (data.in_memory, data.memory_budget_mb)",
            cfg.source,
        )
    if cfg.config.data.transfer_set is None:
        return data, splits
    from kdpipe.ml.data.transfer_splits import use_transfer_set

    return use_transfer_set(cfg, data, splits)


def _open_data(cfg: LoadedConfig) -> tuple[Any, Any]:
    if cfg.config.data.dataset not in FILE_DATASETS:
        data = cfg.memo.pop("loaded_dataset", None) or load_dataset(cfg)  # preflight's, when it loaded it
        return _with_unlabeled(cfg, data, make_splits(cfg, data))
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
    extra = unlabeled.listing(cfg)
    images += len(extra) if extra is not None else 0
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


def _append(files: filelists.FileList, more: filelists.FileList) -> filelists.FileList:
    """``files`` followed by ``more``, whose paths are rebased to be relative to ``files.root``."""
    rebased = np.array([os.fsencode(os.path.relpath(more.path(i), files.root)) for i in range(len(more))])
    paths = np.concatenate([files.paths, rebased]) if len(more) else files.paths
    return filelists.FileList(files.root, paths, np.concatenate([files.labels, more.labels]))


def _train_rows(cfg: LoadedConfig) -> tuple[filelists.FileList, np.ndarray, np.ndarray]:
    """The training list of an image dataset (with a val list of its own appended) and its (train, val) rows."""
    conf = cfg.config.data
    found = sources.listing(cfg)
    train = found.splits["train"]
    if "val" not in found.splits:
        train_idx, val_idx = filelists.split_train(conf, train)
        return train, train_idx, val_idx
    # a list file of its own: train + val in one list, val at the end
    train_idx = np.arange(len(train))
    val_idx = np.arange(len(train), len(train) + len(found.splits["val"]))
    train = _append(train, found.splits["val"])
    if conf.train_subset is not None and conf.train_subset < len(train_idx):
        rank = filelists.hash_fraction(conf.seed, train.paths[train_idx], "subset")
        train_idx = np.sort(train_idx[np.argsort(rank)[: conf.train_subset]])
    return train, train_idx, val_idx


def training_labels(cfg: LoadedConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(classes, labels, training rows) of the dataset before ``data.labels_per_class`` and ``data.unlabeled``,
    from the listing (image datasets) or the labels (in-memory sets, loaded once: the loading reuses them)."""
    if cfg.config.data.dataset not in FILE_DATASETS:
        if "loaded_dataset" not in cfg.memo:
            cfg.memo["loaded_dataset"] = load_dataset(cfg)
        data = cfg.memo["loaded_dataset"]
        return list(data.classes), data.train_y.numpy(), make_splits(cfg, data).train_idx.numpy()
    train, train_idx, _ = _train_rows(cfg)
    return sources.listing(cfg).classes, train.labels, train_idx


def check_not_held_out(cfg: LoadedConfig, extra: unlabeled.Unlabeled) -> None:
    """No unlabelled file is a validation or test image of the dataset (it would train on what selects and
    reports)."""
    train, _, val_idx = _train_rows(cfg)
    test = sources.listing(cfg).splits["test"]
    held = {os.path.abspath(train.path(int(i))) for i in val_idx}
    held |= {os.path.abspath(test.path(i)) for i in range(len(test))}
    for rel in extra.paths:
        path = os.path.abspath(extra.root / rel)  # type: ignore[operator]
        if path in held:
            raise ConfigError(
                "data.unlabeled",
                f"{path} is a validation or test image of the dataset; unlabelled images must be other images",
                cfg.source,
            )


def _keep_labels(cfg: LoadedConfig, classes: list[str], labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``labels`` with the training ``rows`` that ``data.labels_per_class`` leaves unlabelled set to -1."""
    conf = cfg.config.data
    if conf.labels_per_class is None:
        return labels
    keep = unlabeled.keep_labels(labels, rows, conf.labels_per_class, conf.seed, classes, cfg.source)
    return unlabeled.without_labels(labels, rows, keep)


def _with_unlabeled(cfg: LoadedConfig, data: Dataset, splits: Splits) -> tuple[Dataset, Splits]:
    """An in-memory set with ``data.labels_per_class`` applied and ``data.unlabeled``'s images decoded (to its
    size and channels) after its training images, with label -1."""
    conf = cfg.config.data
    extra = unlabeled.listing(cfg)
    if conf.labels_per_class is None and extra is None:
        return data, splits
    labels = _keep_labels(cfg, data.classes, data.train_y.numpy(), splits.train_idx.numpy())
    data = dataclasses.replace(data, train_y=torch.from_numpy(labels))
    if extra is None:
        return data, Splits(data, splits.train_idx, splits.val_idx)
    c, h, w = data.input_shape
    geo = Geometry(c, (h, w))
    bad = BadImages(conf.skip_bad_images, listed=list(extra.skipped))
    images = _decode_unlabeled(cfg, extra, geo, _loaders(cfg), bad)
    n = len(data.train_x)
    data = dataclasses.replace(
        data,
        train_x=torch.cat([data.train_x, images]),
        train_y=torch.cat([data.train_y, torch.full((len(images),), unlabeled.UNLABELED, dtype=torch.int64)]),
        source_report={"path": "in_memory", "unlabeled_images": len(images), **bad.report()},
    )
    train_idx = torch.cat([splits.train_idx, torch.arange(n, n + len(images))])
    return data, Splits(data, train_idx, splits.val_idx)


def _decode_unlabeled(
    cfg: LoadedConfig, extra: unlabeled.Unlabeled, geo: Geometry, loaders: Loaders, bad: BadImages
) -> torch.Tensor:
    """``data.unlabeled``'s images as one uint8 tensor of ``geo``'s shape (bad ones dropped or one line)."""
    eval_t = eval_transform(cfg.config.data, geo)
    if not extra.streams_as_shards:
        x, ok = _decode_all(ImageFiles(extra.file_list(), geo, *eval_t), loaders, bad)
        return x[torch.from_numpy(ok)] if not ok.all() else x
    out = []
    ds = ShardImages(extra.shards, geo, *eval_t, unlabeled=frozenset(str(p) for p in extra.shards))
    for x, _, _, errors in loaders.make(ds, batch_size=256, workers=min(1, loaders.workers)):
        keep = bad.check(lambda i, er=errors: er[i].split(": ", 1)[0], errors)
        out.append(x[keep] if len(keep) < len(x) else x)
    return torch.cat(out) if out else torch.empty((0, *geo.shape), dtype=torch.uint8)


def _open_files(cfg: LoadedConfig) -> tuple[Any, Any]:
    conf = cfg.config.data
    found = sources.listing(cfg)
    extra = unlabeled.listing(cfg)
    bad = BadImages(conf.skip_bad_images, listed=[*found.skipped, *(extra.skipped if extra else [])])
    test = found.splits["test"]
    train, train_idx, val_idx = _train_rows(cfg)
    train = filelists.FileList(train.root, train.paths, _keep_labels(cfg, found.classes, train.labels, train_idx))
    stats_rows = _stats_rows(conf.seed, train, train_idx)  # the dataset's own images: as without data.unlabeled
    shards = extra is not None and extra.streams_as_shards
    if extra is not None and not shards:  # unlabelled files: more rows of the training list, label -1
        n = len(train)
        train = _append(train, extra.file_list())
        train_idx = np.concatenate([train_idx, np.arange(n, len(train))])
    geo = _first_geometry(cfg, train.path(0))
    loaders = _loaders(cfg)
    eval_t = eval_transform(conf, geo)
    in_memory = choose_in_memory(cfg, len(train) + len(test) + (len(extra) if extra and shards else 0), geo.shape)
    if shards and not in_memory:
        raise ConfigError("data.unlabeled", SHARDS_BESIDE_FILES, cfg.source)
    labels = {"train": torch.from_numpy(train.labels), "test": torch.from_numpy(test.labels)}
    if in_memory:
        train_x, ok = _decode_all(ImageFiles(train, geo, *eval_t), loaders, bad)
        test_x, test_ok = _decode_all(ImageFiles(test, geo, *eval_t), loaders, bad)
        train_idx, val_idx = train_idx[ok[train_idx]], val_idx[ok[val_idx]]
        if not test_ok.all():
            test_x, labels["test"] = test_x[torch.from_numpy(test_ok)], labels["test"][torch.from_numpy(test_ok)]
        sample = train_x[torch.from_numpy(stats_rows)]
        mean, std, _ = _stats(cfg, lambda: sample.split(256))
        if shards:  # unlabelled shards, decoded after the training list's images
            assert extra is not None
            more = _decode_unlabeled(cfg, extra, geo, loaders, bad)
            train_idx = np.concatenate([train_idx, np.arange(len(train_x), len(train_x) + len(more))])
            train_x = torch.cat([train_x, more])
            labels["train"] = torch.cat([labels["train"], torch.full((len(more),), unlabeled.UNLABELED)])
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
    unlabeled.check_val(val_labels, str(shards.get("val", shards["train"])[0]))
    bad = BadImages(conf.skip_bad_images)
    tensors = {"train": torch.from_numpy(train_labels), "test": torch.from_numpy(labels["test"]),
               "val": torch.from_numpy(val_labels)}  # fmt: skip
    transforms = {"eval": eval_transform(conf, geo), "train": train_transform(conf, geo)}
    data = StreamData(conf.dataset, classes, geo, [0.0], [1.0], sources_, tensors, transforms, _loaders(cfg), bad)
    training = ~is_val
    extra = unlabeled.listing(cfg)
    if extra is not None:  # data.unlabeled's shards, read after the training shards: every sample trains, label -1
        data.unlabeled_shards = list(extra.shards)
        listed += list(zip(extra.shards, extra.shard_keys(), strict=True))
        training = np.concatenate([training, np.ones(len(extra), dtype=bool)])
        # train_y counts them (training batches, the labelled part); train_x stays the labelled shards' images
        data.train_y = torch.cat([data.train_y, torch.full((len(extra),), unlabeled.UNLABELED, dtype=torch.int64)])
    data.shard_rows = ShardRows.of(listed, training)
    n = min(STATS_SAMPLE, len(train_labels))
    mean, std, _ = _stats(cfg, lambda: iter([data.train_x[:n]]))
    data.mean, data.std = mean, std
    return data, StreamSplits(data, None, None, len(data.train_y))
