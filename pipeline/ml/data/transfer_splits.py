"""A run's splits when ``data.transfer_set`` names a transfer set: its images are the training split, the dataset's
own val and test split stay (:mod:`kdpipe.ml.data.transfer_sets` has the folder's layout and checks)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kdpipe.config import LoadedConfig
from kdpipe.errors import ConfigError
from kdpipe.fileio import FileDigests
from kdpipe.ml.data.memory import Dataset, Splits, steps_per_epoch, train_batches
from kdpipe.ml.data.transfer_sets import TransferSet, open_transfer_set, read_images


class TransferSplits:
    """Splits whose training part is a transfer set's images, passed over ``repeats`` times per epoch (each pass
    freshly shuffled and augmented); val and test are the dataset's. The training loop reaches it through
    :func:`kdpipe.ml.data.memory.train_batches` and :func:`~kdpipe.ml.data.memory.steps_per_epoch`, like streamed
    splits."""

    def __init__(self, data: Any, train_idx: Any, val_idx: Any, repeats: int) -> None:
        self.data, self.train_idx, self.val_idx, self.repeats = data, train_idx, val_idx, repeats

    @property
    def val_x(self) -> Any:
        return self.data.train_x[self.val_idx]

    @property
    def val_y(self) -> Any:
        return self.data.train_y[self.val_idx]

    def _passes(self) -> Any:
        return Splits(self.data, self.train_idx.repeat(self.repeats), self.val_idx)

    def train_batches(self, batch_size: int, seed: int, epoch: int, augment: Any, views: Any = None) -> Iterator[Any]:
        yield from train_batches(self._passes(), batch_size, seed, epoch, augment, views)

    def steps_per_epoch(self, batch_size: int, seed: int = 0) -> int:
        return steps_per_epoch(self._passes(), batch_size, seed)


def use_transfer_set(cfg: LoadedConfig, data: Any, splits: Any) -> tuple[Any, TransferSplits]:
    """``(data, splits)`` of the configured dataset with ``data.transfer_set``'s images as the training split: the
    in-memory dataset's training tensor becomes its val images followed by the transfer set's (so no training
    image of the dataset is kept), test is unchanged. The folder is checked as the plan checked it (digests
    remembered in the cache's fingerprints.json are not re-read)."""
    if not isinstance(data.train_x, torch.Tensor):
        raise ConfigError(
            "data.transfer_set",
            "needs the dataset in memory, and this one streams (data.in_memory, data.recipe, data.memory_budget_mb)",
            cfg.source,
        )
    found = open_transfer_set(cfg, list(data.classes), FileDigests(cfg.cache_dir / "fingerprints.json"))
    labels = np.asarray(found.labels, dtype=np.int64)
    rank = np.zeros(len(labels), dtype=np.int64)  # each image's place within its class
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    order = np.lexsort((labels, rank))  # interleaved by class: any first k images (int8 calibration) are balanced
    found = TransferSet(found.folder, [found.paths[i] for i in order], labels[order].tolist(), found.provenance)
    images = torch.from_numpy(read_images(found, tuple(data.input_shape)))
    labels = torch.from_numpy(labels[order])
    n_val = len(splits.val_idx)
    prov = found.provenance or {}
    report = {
        "folder": str(found.folder),
        "images": len(labels),
        "per_class": found.per_class(len(data.classes)),
        "repeats": cfg.config.data.transfer_repeats,
        "provenance": {k: prov[k] for k in ("method", "iterations", "per_class", "seed") if k in prov} or None,
    }
    out = Dataset(
        name=data.name,
        classes=list(data.classes),
        train_x=torch.cat([splits.val_x, images]),
        train_y=torch.cat([splits.val_y, labels]),
        test_x=data.test_x,
        test_y=data.test_y,
        mean=list(data.mean),
        std=list(data.std),
        source_report={**(data.source_report or {}), "transfer_set": report},
    )
    train_idx = torch.arange(n_val, n_val + len(labels))
    return out, TransferSplits(out, train_idx, torch.arange(n_val), cfg.config.data.transfer_repeats)
