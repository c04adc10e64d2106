"""Datasets as uint8 tensors in memory, a seeded train/val split, and batched augmentation.

Small datasets (Fashion-MNIST, CIFAR, synthetic, small image folders) are loaded once as whole tensors;
batches are cut, augmented (random crop with padding, horizontal flip) and normalised as tensors, never
one PIL image at a time. Larger image datasets stream (:mod:`kdpipe.ml.data.loaders`); :func:`train_batches`
and :func:`steps_per_epoch` serve either, and both yield the one :class:`Batch` type.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.config import Augment, LoadedConfig
from kdpipe.errors import UsageError, describe
from kdpipe.ml.data import sources
from kdpipe.ml.data.dsa import DSA

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
KNOWN_STATS = {
    "fashion_mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


@dataclass
class Dataset:
    """A whole dataset in memory. Images are uint8 (N, C, H, W); labels int64 (N,)."""

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: list[float]
    std: list[float]
    source_report: dict[str, Any] | None = None  # image datasets: which path holds them, what was skipped

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Splits:
    """Index views over a :class:`Dataset`: train and val are disjoint parts of its training set."""

    data: Dataset
    train_idx: torch.Tensor
    val_idx: torch.Tensor

    @property
    def val_x(self) -> torch.Tensor:
        return self.data.train_x[self.val_idx]

    @property
    def val_y(self) -> torch.Tensor:
        return self.data.train_y[self.val_idx]

    def labeled_part(self) -> Splits:
        """The same splits with only the labelled training images."""
        return Splits(self.data, self.train_idx[self.data.train_y[self.train_idx] >= 0], self.val_idx)


def labeled_part(splits: Any) -> Any:
    """``splits`` (in memory or streamed) with only its labelled training images (label >= 0; ``data.unlabeled``
    and ``data.labels_per_class`` add unlabelled ones): what trains on labels alone (a teacher, ``scratch``) reads.
    ``splits`` itself when every training image has its label."""
    labels = splits.data.train_y[splits.train_idx]
    if len(labels) == 0 or int(labels.min()) >= 0:
        return splits
    return splits.labeled_part()


def _read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """An IDX file (gzipped or not) as an array; a damaged file is one line naming it and what is wrong."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error) as exc:  # a gzip stream cut short, or damaged inside
        raise UsageError(f"{path}: truncated or damaged gzip file ({exc})") from None
    except gzip.BadGzipFile as exc:
        raise UsageError(f"{path}: not a gzip file ({exc}); re-download it or remove the .gz suffix") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise UsageError(f"{path}: not an IDX file of unsigned bytes")
    if ndim is not None and raw[3] != ndim:
        raise UsageError(f"{path}: an IDX file of {raw[3]} dimensions, expected {ndim} (are the files swapped?)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UsageError(f"{path}: truncated IDX header")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise UsageError(f"{path}: truncated or damaged IDX file ({len(raw)} bytes, expected {expected})")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _fashion(cfg: LoadedConfig) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    f = sources.locate_fashion_mnist(cfg)
    arrays = []
    for split in ("train", "t10k"):
        images = _read_idx(f[f"{split}-images-idx3-ubyte"], ndim=3)
        labels_file = f[f"{split}-labels-idx1-ubyte"]
        labels = _read_idx(labels_file, ndim=1)
        if len(labels) != len(images):
            raise UsageError(f"{labels_file}: {len(labels)} labels for {len(images)} images")
        if labels.size and labels.max() >= len(FASHION_CLASSES):
            raise UsageError(f"{labels_file}: label {labels.max()} outside 0-{len(FASHION_CLASSES) - 1}")
        arrays += [images[:, None], labels]
    return FASHION_CLASSES, *arrays


def _cifar(cfg: LoadedConfig) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from torchvision import datasets

    folder = sources.locate_cifar(cfg)
    cls = datasets.CIFAR10 if cfg.config.data.dataset == "cifar10" else datasets.CIFAR100
    try:
        train, test = cls(str(folder.parent), train=True), cls(str(folder.parent), train=False)
    except Exception as exc:  # torchvision checks md5s (RuntimeError) and unpickles (many error types)
        raise UsageError(f"{folder}: damaged {cfg.config.data.dataset} files ({describe(exc)})") from None
    to_chw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    return list(train.classes), to_chw(train.data), np.array(train.targets), to_chw(test.data), np.array(test.targets)


def _synthetic(cfg: LoadedConfig) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Smooth, left-right symmetric class templates plus noise: learnable in a few steps even under
    crop/flip augmentation, and fully determined by the config."""
    s = cfg.config.data.synthetic
    rng = np.random.default_rng(1234 + cfg.config.data.seed)
    coarse = rng.uniform(0, 255, size=(s.num_classes, s.channels, 3, 3))
    grid = np.linspace(0, 2, s.image_size)
    i0 = np.minimum(grid.astype(int), 1)
    w = (grid - i0)[None, None]  # bilinear upsampling of the 3x3 grid, one axis at a time
    rows = coarse[:, :, i0] * (1 - w[..., None]) + coarse[:, :, i0 + 1] * w[..., None]
    templates = rows[..., i0] * (1 - w[:, :, None]) + rows[..., i0 + 1] * w[:, :, None]
    templates = (templates + templates[..., ::-1]) / 2

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, s.num_classes, size=n)
        noise = rng.normal(0, 40, size=(n, s.channels, s.image_size, s.image_size))
        return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels

    train_x, train_y = make(s.train_size)
    test_x, test_y = make(s.test_size)
    return [f"class{i}" for i in range(s.num_classes)], train_x, train_y, test_x, test_y


def load_dataset(cfg: LoadedConfig) -> Dataset:
    """Load the configured dataset into memory."""
    data = cfg.config.data
    loader = {"fashion_mnist": _fashion, "synthetic": _synthetic}.get(data.dataset, _cifar)
    classes, train_x, train_y, test_x, test_y = loader(cfg)
    tx = torch.from_numpy(np.ascontiguousarray(train_x))
    if data.normalize:
        mean, std = list(data.normalize.mean), list(data.normalize.std)
        if len(mean) != tx.shape[1]:
            raise UsageError(f"data.normalize: {len(mean)} values for {tx.shape[1]}-channel images")
    elif data.dataset in KNOWN_STATS:
        mean, std = KNOWN_STATS[data.dataset]
    else:  # exact, a chunk at a time: never a float copy of the whole set
        from kdpipe.ml.data.recipes import channel_stats

        mean, std = channel_stats(tx.split(1024))
    return Dataset(
        name=data.dataset,
        classes=list(classes),
        train_x=tx,
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
        mean=list(mean),
        std=list(std),
    )


def make_splits(cfg: LoadedConfig, data: Dataset) -> Splits:
    """Seeded split of the training set into train and val; the test split is never used for selection."""
    conf = cfg.config.data
    n = len(data.train_y)
    g = torch.Generator().manual_seed(conf.seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, round(n * conf.val_fraction))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:]
    if conf.train_subset is not None:
        train_idx = train_idx[: conf.train_subset]
    return Splits(data=data, train_idx=train_idx.sort().values, val_idx=val_idx)


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (or [0,1] float) images → normalised float32 (a streamed image sequence is decoded whole)."""
    if not isinstance(x, torch.Tensor):
        x = x[:]
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass
class Batch:
    """One training batch: normalised images, labels (-1: an unlabelled image, see :attr:`labeled`), their dataset
    indices and (with cached teacher features) which precomputed augmented view of each image this is; ``epoch``
    (0-based) is set by the training loop, for losses scheduled over epochs (DKD's warm-up)."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    view: torch.Tensor | None = None
    local: bool = False  # already this rank's share (streamed batches are read per rank)
    epoch: int = 0

    @property
    def labeled(self) -> torch.Tensor:
        """Which images have a label (bool, N): unlabelled ones (``data.unlabeled``) carry label -1."""
        return self.y >= 0

    def shard(self, rank: int, size: int) -> Batch:
        """This rank's share of a global batch (data-parallel training)."""
        if self.local:
            return self
        part = slice(rank, None, size)
        view = None if self.view is None else self.view[part]
        return Batch(self.x[part], self.y[part], self.index[part], view, epoch=self.epoch)

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> Batch:
        return Batch(
            self.x.to(device, non_blocking=True).contiguous(memory_format=memory_format),
            self.y.to(device, non_blocking=True),
            self.index,
            self.view,
            self.local,
            self.epoch,
        )


@dataclass
class ViewTable:
    """Fixed augmentation parameters of ``views`` views of every training image (rows: dataset index).

    Cached teacher features are computed on exactly these views, so training can sample a view and
    replay its crop and flip on the student's input.
    """

    oy: torch.Tensor  # (N, views) int, crop offsets
    ox: torch.Tensor
    flip: torch.Tensor  # (N, views) bool

    @property
    def views(self) -> int:
        return self.oy.shape[1]


def sample_params(n: int, conf: Augment, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop offsets and flip flags for ``n`` images."""
    p = conf.random_crop_padding
    oy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * p + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5 if conf.horizontal_flip else torch.zeros(n, dtype=torch.bool)
    return oy, ox, flip


def make_view_table(n: int, views: int, conf: Augment, seed: int) -> ViewTable:
    """Seeded augmentation parameters of ``views`` views per image; view 0 is the plain image."""
    g = torch.Generator().manual_seed(seed)
    oy, ox, flip = (t.view(views, n).T.contiguous() for t in sample_params(n * views, conf, g))
    oy[:, 0] = ox[:, 0] = conf.random_crop_padding
    flip[:, 0] = False
    return ViewTable(oy, ox, flip)


def apply_params(
    x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, conf: Augment
) -> torch.Tensor:
    """Crop (from the image zero-padded by ``random_crop_padding``) at the given offsets, then flip."""
    b, c, h, w = x.shape
    p = conf.random_crop_padding
    if p:
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, conf: Augment, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, for a whole uint8 batch at once."""
    return apply_params(x, *sample_params(len(x), conf, g), conf)


def train_batches(
    splits: Splits, batch_size: int, seed: int, epoch: int, conf: Augment, views: ViewTable | None = None
) -> Iterator[Batch]:
    """Shuffled, augmented, normalised training batches; a pure function of (seed, epoch) so runs resume exactly.

    With ``views``, each image appears as one of its precomputed views (chosen at random), replayed exactly.
    Streamed splits read their batches through loader workers (the same :class:`Batch`, this rank's share).
    """
    if not isinstance(splits, Splits):
        yield from splits.train_batches(batch_size, seed, epoch, conf, views)
        return
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    dsa = DSA() if conf.dsa and views is None else None
    order = splits.train_idx[torch.randperm(len(splits.train_idx), generator=g)]
    data = splits.data
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on one image
            continue
        if views is None:
            x, view = augment(data.train_x[idx], conf, g), None
        else:
            view = torch.randint(0, views.views, (len(idx),), generator=g)
            x = apply_params(data.train_x[idx], views.oy[idx, view], views.ox[idx, view], views.flip[idx, view], conf)
        x = normalize(x, data.mean, data.std)
        yield Batch(x if dsa is None else dsa(x, g), data.train_y[idx], idx, view)


def steps_per_epoch(splits: Splits, batch_size: int, seed: int = 0) -> int:
    if not isinstance(splits, Splits):
        return splits.steps_per_epoch(batch_size, seed)
    n = len(splits.train_idx)
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)
