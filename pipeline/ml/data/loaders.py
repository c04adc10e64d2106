"""The streaming data path: images decoded per batch in DataLoader worker processes, never all at once.

:class:`StreamData` and :class:`StreamSplits` stand where the in-memory :class:`~kdpipe.ml.data.memory.Dataset` and
:class:`~kdpipe.ml.data.memory.Splits` do, with the same attributes, so every stage reads data one way:

- training: ``train_batches(splits, ...)`` yields :class:`~kdpipe.ml.data.memory.Batch` (normalised images,
  labels, indices) whichever path holds the data;
- evaluation: ``test_x`` / ``val_x`` / ``train_x`` are image sequences. In memory they are uint8 tensors;
  here they are :class:`LazyImages`, whose slices are uint8 batches decoded by loader workers (a scan in
  order, as ``predict`` makes, reuses one loader and its prefetching).

Memory therefore depends on the batch size, the workers and their prefetch, not on the dataset size.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdpipe.errors import UsageError
from kdpipe.ml.data.datasets import EpochSampler, ImageFiles, ShardImages
from kdpipe.ml.data.filelists import SKIP_HINT


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class BadImages:
    """Images skipped (``data.skip_bad_images``) or, without it, the first one stops the run."""

    skip: bool
    seen: set[str] = field(default_factory=set)
    listed: list[str] = field(default_factory=list)  # found while listing files (missing, empty folders)

    def check(self, name: Callable[[int], str], errors: Sequence[str]) -> list[int]:
        """Rows of a batch to keep; raises (one line naming the file, ``name(row)``) unless skipping."""
        bad = [i for i, e in enumerate(errors) if e]
        if not bad:
            return list(range(len(errors)))
        if not self.skip:
            raise UsageError(f"{name(bad[0])}: unreadable image ({errors[bad[0]]}); {SKIP_HINT}")
        self.seen.update(name(i) for i in bad)
        return [i for i in range(len(errors)) if not errors[i]]

    def report(self) -> dict[str, Any]:
        found = sorted(self.seen)
        return {
            "skipped_images": len(found) + len(self.listed),
            "examples": (self.listed + found)[:5],
        }


class Loaders:
    """DataLoader settings shared by every loader of one dataset (workers, pinning, persistence)."""

    def __init__(self, workers: int | None, pin: bool) -> None:
        self.workers = usable_cores() if workers is None else workers
        self.pin = pin

    def make(self, dataset: Any, **kw: Any) -> torch.utils.data.DataLoader:
        workers = kw.pop("workers", self.workers)
        persistent = kw.pop("persistent", False)
        return torch.utils.data.DataLoader(
            dataset,
            num_workers=workers,
            pin_memory=self.pin,
            persistent_workers=workers > 0 and persistent,
            prefetch_factor=2 if workers > 0 else None,
            multiprocessing_context="fork" if workers > 0 and hasattr(os, "fork") else None,
            **kw,
        )


class LazyImages:
    """A split's evaluation images (uint8, N×C×H×W) decoded on demand: ``len`` and slicing like a tensor."""

    def __init__(self, owner: StreamData, split: str, rows: np.ndarray | None, labels: torch.Tensor) -> None:
        self.owner, self.split, self.rows, self.labels = owner, split, rows, labels
        self._scan: tuple[int, int, int, Iterator[Any]] | None = None  # (pid, next start, batch size, iterator)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.owner.input_shape)

    def _loader(self, rows: np.ndarray | None, batch_size: int, start: int = 0) -> torch.utils.data.DataLoader:
        ds = self.owner.eval_dataset(self.split)
        if rows is None:  # shards: a stream in shard order (one reader keeps the order the labels were listed in)
            return self.owner.loaders.make(ds, batch_size=batch_size, workers=min(1, self.owner.loaders.workers))
        return self.owner.loaders.make(torch.utils.data.Subset(ds, rows[start:].tolist()), batch_size=batch_size)

    def _collect(self, batch: Any) -> torch.Tensor:
        x, _, index, errors = batch
        # in evaluation a skipped image stays blank, keeping the labels aligned
        self.owner.bad.check(lambda i: self.owner.describe(self.split, int(index[i]), errors[i]), errors)
        return x

    def __getitem__(self, key: slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("LazyImages slices take no step")
            if stop <= start:
                return torch.empty((0, *self.owner.input_shape), dtype=torch.uint8)
            size = stop - start
            scan = self._scan
            if scan is None or scan[0] != os.getpid() or scan[1] != start or scan[2] != size:
                if self.rows is None and start != 0:
                    raise IndexError("shard images are read in order from the start")
                self._scan = scan = None  # let the previous scan's workers go before new ones start
                it = iter(self._loader(self.rows, size, start))
            else:
                it = scan[3]
            x = self._collect(next(it))
            self._scan = (os.getpid(), start + size, size, it) if stop < len(self) else None
            return x
        want = np.asarray(key).reshape(-1)
        if self.rows is None:  # shards: the first len(key) images (calibration wants training images, any ones)
            return self[: len(want)]
        out = [self._collect(b) for b in self._loader(self.rows[want], 64)]
        return torch.cat(out) if out else torch.empty((0, *self.owner.input_shape), dtype=torch.uint8)


class StreamData:
    """A dataset streamed from files or shards; attributes match :class:`~kdpipe.ml.data.memory.Dataset`."""

    def __init__(
        self,
        name: str,
        classes: list[str],
        geo: Any,
        mean: list[float],
        std: list[float],
        sources: dict[str, Any],
        labels: dict[str, torch.Tensor],
        transforms: dict[str, Any],
        loaders: Loaders,
        bad: BadImages,
    ) -> None:
        self.name, self.classes, self.geo, self.mean, self.std = name, classes, geo, mean, std
        self.sources, self.transforms, self.loaders, self.bad = sources, transforms, loaders, bad
        self.train_y, self.test_y = labels["train"], labels["test"]
        self.train_x = LazyImages(self, "train", self._rows("train"), self.train_y)
        self.test_x = LazyImages(self, "test", self._rows("test"), self.test_y)
        self.val_labels = labels.get("val")  # shards with their own val split
        self.shard_rows: Any = None  # shards: each training sample's row in the training split (ShardRows)
        self.unlabeled_shards: list[Any] = []  # shards of unlabelled training samples (data.unlabeled), read after

    def _rows(self, split: str) -> np.ndarray | None:
        src = self.sources[split]
        return np.arange(len(src)) if hasattr(src, "paths") else None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.geo.shape

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def eval_dataset(self, split: str) -> Any:
        src = self.sources[split]
        transform, draft = self.transforms["eval"]
        if hasattr(src, "paths"):
            return ImageFiles(src, self.geo, transform, draft)
        shards, keep = src
        return ShardImages(shards, self.geo, transform, draft, keep=keep)

    @property
    def source_report(self) -> dict[str, Any]:
        return {"path": "streaming", "workers": self.loaders.workers, **self.bad.report()}

    def describe(self, split: str, index: int, error: str) -> str:
        src = self.sources[split]
        return str(src.path(index)) if hasattr(src, "paths") and index >= 0 else error.split(": ", 1)[0]


class StreamSplits:
    """Train and val of a :class:`StreamData`, with training batches read through loader workers."""

    def __init__(self, data: StreamData, train_idx: np.ndarray | None, val_idx: np.ndarray | None, n_train: int):
        self.data = data
        self.train_idx = torch.from_numpy(train_idx) if train_idx is not None else torch.arange(n_train)
        self.streamed_train = train_idx is None  # shards: indices only count the images
        if val_idx is not None:
            self.val_idx = torch.from_numpy(val_idx)
            self.val_x = LazyImages(data, "train", val_idx, data.train_y[self.val_idx])
        else:
            assert data.val_labels is not None
            self.val_idx = torch.arange(len(data.val_labels))
            self.val_x = LazyImages(data, "val", None, data.val_labels)
        self.val_y = self.val_x.labels
        self._train: dict[tuple[int, int, int, int], Any] = {}
        self.with_unlabeled = True  # shards: read data.unlabeled's shards too (file lists: their rows are in train_idx)

    def labeled_part(self) -> StreamSplits:
        """The same splits with only the labelled training images (see :func:`kdpipe.ml.data.memory.labeled_part`)."""
        part = copy.copy(self)
        part._train = {}
        labels = self.data.train_y[self.train_idx]
        if self.streamed_train:  # shards: the labelled samples are the training shards', listed first
            part.train_idx, part.with_unlabeled = torch.arange(int((labels >= 0).sum())), False
        else:
            part.train_idx = self.train_idx[labels >= 0]
        return part

    def _sampler_loader(self, batch_size: int, seed: int) -> tuple[Any, Any]:
        """The epoch source (sampler or shard stream) and loader for this process; workers persist across epochs."""
        from kdpipe.ml.runtime.distributed import world

        rank, size = world()
        local = max(1, batch_size // size)
        key = (os.getpid(), local, size)
        if key not in self._train:
            d = self.data
            # recipe cifar: workers decode, the main process augments whole batches (see train_batches)
            transform, draft = d.transforms["train"] or d.transforms["eval"]
            if self.streamed_train:
                shards, keep = d.sources["train"]
                extra = d.unlabeled_shards if self.with_unlabeled else []
                ds = ShardImages(
                    [*shards, *extra], d.geo, transform, draft, seed=seed, shuffle=True, rank=rank, size=size,
                    keep=keep, rows=d.shard_rows, unlabeled=frozenset(str(p) for p in extra),
                )  # fmt: skip
                self._train[key] = (ds, d.loaders.make(ds, batch_size=local))
            else:
                sampler = EpochSampler(self.train_idx.numpy(), local, seed, rank, size)
                ds = ImageFiles(d.sources["train"], d.geo, transform, draft, random=d.transforms["train"] is not None)
                self._train[key] = (sampler, d.loaders.make(ds, batch_size=local, sampler=sampler, persistent=True))
        source, loader = self._train[key]
        source.seed = seed
        return source, loader

    def steps_per_epoch(self, batch_size: int, seed: int = 0) -> int:
        if self.streamed_train:
            from kdpipe.ml.runtime.distributed import world

            glob = batch_size // world()[1] * world()[1]
            return max(1, len(self.train_idx) // glob)
        return self._sampler_loader(batch_size, seed)[0].steps()

    def train_batches(self, batch_size: int, seed: int, epoch: int, augment: Any, views: Any = None) -> Iterator[Any]:
        """One epoch of augmented, normalised batches (this rank's share under data-parallel training).

        Recipe cifar augments in the main process with the in-memory path's generator, drawn in the same order
        (the permutation, then each global batch's crops and flips), so both paths train on the same batches."""
        from kdpipe.ml.data.memory import Batch, apply_params, normalize, sample_params

        if views is not None:
            raise UsageError("cached teacher features (features.enabled) need the in-memory data path")
        from kdpipe.ml.runtime.distributed import world

        rank, size = world()
        epoch_source, loader = self._sampler_loader(batch_size, seed)
        epoch_source.set_epoch(epoch)
        steps = self.steps_per_epoch(batch_size, seed)
        batched = self.data.transforms["train"] is None
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if batched and not self.streamed_train:
            torch.randperm(
                len(self.train_idx), generator=g
            )  # the sampler's permutation, as the in-memory path draws it
        made = 0
        while made < steps:
            produced = 0
            for x, y, index, errors in loader:
                produced += 1
                if batched:  # the whole global batch's parameters, this rank's rows
                    params = sample_params(len(y) * size, augment, g)
                    x = apply_params(x, *(p[rank::size] for p in params), augment)
                keep = self.data.bad.check(
                    lambda i, ix=index, er=errors: self.data.describe("train", int(ix[i]), er[i]), errors
                )
                if len(keep) < len(errors):
                    x, y, index = x[keep], y[keep], index[keep]
                if len(y) >= 2:  # BatchNorm cannot train on one image
                    yield Batch(normalize(x, self.data.mean, self.data.std), y, index, None, local=True)
                made += 1
                if made >= steps:
                    break
            if not self.streamed_train or produced == 0:
                break  # file lists: the sampler gives exactly `steps`; shards may be short on a rank: go round
