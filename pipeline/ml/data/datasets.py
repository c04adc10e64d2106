"""torch Datasets that decode one image at a time: files on disk (ImageFolder, list files) and WebDataset shards.

An image that cannot be decoded does not raise inside the worker (the DataLoader would wrap it in a
multi-line traceback). It comes back as a blank image with the reason; the main process then stops
with one line naming the file, or skips and counts it (``data.skip_bad_images``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.ml.data.filelists import FileList, hash_fraction
from kdpipe.ml.data.recipes import Geometry, open_image, sample_seed, seeded

Item = tuple[torch.Tensor, int, int, str]  # uint8 image, label, index, error ("" when fine)


def _decode(source: Path | bytes, label: int, index: int, geo: Geometry, transform: Callable, draft, seed) -> Item:
    try:
        image = open_image(source, geo.channels, draft)
        x = seeded(transform, image, seed)
        if tuple(x.shape) != geo.shape:
            raise ValueError(f"decoded to {tuple(x.shape)}, expected {geo.shape}")
        return x, label, index, ""
    except Exception as exc:  # PIL raises many types; every one means "this image is bad"
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        return torch.zeros(geo.shape, dtype=torch.uint8), label, index, reason or "unreadable"


class ImageFiles(torch.utils.data.Dataset):
    """Images of a :class:`~kdpipe.ml.data.filelists.FileList`, decoded and transformed on access.

    An item is either a row number (deterministic transforms) or ``(row, epoch_seed)`` from
    :class:`EpochSampler`, which seeds that image's augmentation.
    """

    def __init__(
        self, files: FileList, geo: Geometry, transform: Callable, draft: tuple[int, int] | None, random: bool = False
    ) -> None:
        self.files, self.geo, self.transform, self.draft, self.random = files, geo, transform, draft, random

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]) -> Item:
        i, seed = item if isinstance(item, tuple) else (item, None)
        return _decode(
            self.files.path(i), int(self.files.labels[i]), i, self.geo, self.transform, self.draft,
            None if seed is None or not self.random else sample_seed(seed, 0, i),
        )  # fmt: skip

    def name(self, index: int) -> str:
        return str(self.files.path(index))


class EpochSampler(torch.utils.data.Sampler):
    """One epoch's order of ``rows`` as (row, epoch seed) items: a permutation seeded by (seed, epoch), the same
    as the in-memory path's. Under data-parallel training rank r takes items r, r+size, ... of every global
    batch of ``batch_size * size`` (what the in-memory path's :meth:`Batch.shard` takes), and only whole
    global batches are used so that every rank makes the same number of steps."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, rank: int = 0, size: int = 1) -> None:
        self.rows, self.batch_size, self.seed, self.rank, self.size = rows, batch_size, seed, rank, size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = self.rows[torch.randperm(len(self.rows), generator=g).numpy()]
        glob = self.batch_size * self.size
        if self.size > 1:
            order = order[: len(order) // glob * glob]
            return order.reshape(-1, glob)[:, self.rank :: self.size].reshape(-1)
        if len(order) % self.batch_size == 1:  # BatchNorm cannot train on a last batch of one image
            order = order[:-1]
        return order

    def steps(self) -> int:
        return -(-len(self._order()) // self.batch_size)

    def __len__(self) -> int:
        return len(self._order())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = self.seed * 100_003 + self.epoch
        return iter([(int(i), epoch_seed) for i in self._order()])


class ShardRows:
    """Each training sample's row in the training split, by shard and key: rows count the training samples in
    listing order (shard by shard, each in tar order), as the split's labels are listed. A streamed shard batch
    carries these as its images' indices (what methods that keep state per image, like CRD, index by)."""

    def __init__(self, table: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.table = table  # shard path -> (its training keys, sorted; their rows)

    @classmethod
    def of(cls, listed: list[tuple[Path, list[str]]], training: np.ndarray) -> ShardRows:
        """From each shard's keys in listing order and which samples of that whole listing are training ones."""
        table, row, start = {}, 0, 0
        for path, keys in listed:
            names = np.array([k.encode() for k in keys], dtype=bytes)
            mine = names[training[start : start + len(keys)]]
            start += len(keys)
            order = np.argsort(mine, kind="stable")
            table[str(path)] = (mine[order], np.arange(row, row + len(mine))[order])
            row += len(mine)
        return cls(table)

    def row(self, shard: str, key: str) -> int:
        """The sample's row, or -1 (not a training sample)."""
        keys, rows = self.table.get(shard, (np.array([], dtype=bytes), np.array([], dtype=np.int64)))
        name = key.encode()
        i = int(np.searchsorted(keys, name))
        return int(rows[i]) if i < len(keys) and keys[i] == name else -1


class ShardImages(torch.utils.data.IterableDataset):
    """Samples of WebDataset tar shards: an image member (jpg/png/...) and a ``cls`` label.

    Shards are shuffled per epoch (seeded), then split first across data-parallel ranks and then across
    loader workers, so each process reads its own shards. ``keep`` selects samples by the stable hash of
    their key: the held-out validation part of the training shards, or the rest. With ``rows`` an item's index is
    the sample's row in the training split (else -1). Samples of the ``unlabeled`` shards (``data.unlabeled``) are
    never held out and carry label -1.
    """

    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")

    def __init__(
        self,
        shards: list[Path],
        geo: Geometry,
        transform: Callable,
        draft: tuple[int, int] | None,
        *,
        seed: int = 0,
        shuffle: bool = False,
        rank: int = 0,
        size: int = 1,
        keep: tuple[int, float, bool] | None = None,
        rows: ShardRows | None = None,
        unlabeled: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.shards, self.geo, self.transform, self.draft = shards, geo, transform, draft
        self.seed, self.shuffle, self.rank, self.size, self.keep = seed, shuffle, rank, size, keep
        self.rows = rows
        self.unlabeled = unlabeled
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _urls(self) -> list[str]:
        urls = [str(p) for p in self.shards]
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(urls)
        if self.size > 1 and len(urls) >= self.size:
            urls = urls[self.rank :: self.size]
        info = torch.utils.data.get_worker_info()
        if info is not None and len(urls) >= info.num_workers:
            urls = urls[info.id :: info.num_workers]
        elif info is not None and info.id > 0:
            urls = []  # fewer shards than workers: worker 0 reads them all
        return urls

    def __iter__(self) -> Iterator[Item]:
        import webdataset as wds

        urls = self._urls()
        if not urls:
            return
        epoch_seed = self.seed * 100_003 + self.epoch
        stages: list[Any] = [wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.reraise_exception)]
        if self.shuffle:  # a seeded sample buffer per epoch, rank and worker
            info = torch.utils.data.get_worker_info()
            rng = random.Random(epoch_seed * 1009 + self.rank * 97 + (info.id if info else 0))
            stages.append(wds.shuffle(1000, initial=100, rng=rng))
        stream: Any = iter(wds.DataPipeline(*stages))
        for sample in stream:
            key = sample["__key__"]
            free = sample.get("__url__") in self.unlabeled  # an unlabelled sample: all training, no label
            if self.keep is not None and not free:
                seed, fraction, val = self.keep
                if (hash_fraction(seed, np.array([key.encode()]))[0] < fraction) != val:
                    continue
            source = next((sample[e] for e in self.IMAGE_EXTS if e in sample), None)
            name = f"{sample.get('__url__', '?')}:{key}"
            label = -1 if free else int(sample.get("cls", b"-1").decode().strip() or -1)
            index = int.from_bytes(key.encode()[-7:].rjust(7, b"\0"), "big") % (2**31)
            if source is None:
                yield torch.zeros(self.geo.shape, dtype=torch.uint8), label, -1, f"{name}: no image member"
                continue
            x, label, _, err = _decode(
                source, label, index, self.geo, self.transform, self.draft,
                sample_seed(epoch_seed, 0, index) if self.shuffle else None,
            )  # fmt: skip
            row = self.rows.row(sample.get("__url__", ""), key) if self.rows is not None else -1
            yield x, label, row, f"{name}: {err}" if err else ""
