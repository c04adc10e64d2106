"""Per-image decoding and the cifar / imagenet transform recipes (torchvision.transforms.v2).

Every transform ends in a uint8 CHW tensor: loader workers ship uint8 (4x less than float through shared
memory and onto the GPU) and the main process normalises whole batches. Random choices are seeded per
sample (seed, epoch, image) rather than per worker, so a streamed epoch is the same whatever the number
of workers, and a run resumed at an epoch boundary sees the same images as one that was never stopped.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from kdpipe.config import DataConfig

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F", "P;L"}
IMAGENET_DEFAULT_SIZE = 224


@dataclass(frozen=True)
class Geometry:
    """What the model sees: channels and the (height, width) every transform produces."""

    channels: int
    size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)


def open_image(source: Path | bytes, channels: int, draft: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode one image (PIL) into a uint8 C×H×W tensor of ``channels`` (1: grayscale, 3: RGB). ``draft``
    lets the JPEG decoder skip resolution the transform would throw away (it keeps at least that size).
    Raises on an unreadable or truncated file. (torchvision.io's decoders are deprecated since 0.29.)"""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        if draft is not None and im.format == "JPEG":
            im.draft(mode, draft)
        out = im.convert(mode)
        out.load()
    return v2.functional.pil_to_tensor(out)


def geometry(conf: DataConfig, first: Path | bytes) -> Geometry:
    """Channels and size from the config, else from the first training image (as the images are)."""
    with Image.open(io.BytesIO(first) if isinstance(first, bytes) else first) as im:
        channels = conf.channels or (1 if im.mode in GRAY_MODES else 3)
        w, h = im.size
    if conf.image_size:
        return Geometry(channels, (conf.image_size, conf.image_size))
    if conf.recipe == "imagenet":
        return Geometry(channels, (IMAGENET_DEFAULT_SIZE, IMAGENET_DEFAULT_SIZE))
    return Geometry(channels, (h, w))


class FitSize(torch.nn.Module):
    """Resize to ``size`` unless the image already has it (most images of a prepared dataset do)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = list(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if list(x.shape[-2:]) == self.size else v2.functional.resize(x, self.size, antialias=True)


def _eval_resize(conf: DataConfig, geo: Geometry) -> tuple[list[Callable], tuple[int, int]]:
    """The deterministic resize (and crop) of the evaluation recipe, and the draft size it allows."""
    if conf.recipe == "imagenet":
        short = round(min(geo.size) / conf.imagenet.crop_fraction)
        return [v2.Resize(short, antialias=True), v2.CenterCrop(geo.size)], (short, short)
    return [FitSize(geo.size)], (geo.size[1], geo.size[0])


def eval_transform(conf: DataConfig, geo: Geometry) -> tuple[v2.Transform, tuple[int, int]]:
    """uint8 image → resized (and cropped) uint8 image (evaluation, in-memory path), and the JPEG draft size."""
    ops, draft = _eval_resize(conf, geo)
    return v2.Compose(ops), draft


def train_transform(conf: DataConfig, geo: Geometry) -> tuple[Callable, None] | None:
    """uint8 image tensor → augmented uint8 tensor for recipe imagenet: RandomResizedCrop(scale, ratio), flip, optional
    TrivialAugmentWide / RandAugment (random crops of the full image: per image, in the workers).

    None for recipe cifar: its pad-crop-flip runs on whole batches in the main process, exactly as on the
    in-memory path (the same generator, so a streamed epoch and an in-memory one are the same batches).
    """
    if conf.recipe != "imagenet":
        return None
    r = conf.imagenet
    flip = [v2.RandomHorizontalFlip()] if conf.augment.horizontal_flip else []
    ops: list[Callable] = [
        v2.RandomResizedCrop(geo.size, scale=tuple(r.scale), ratio=tuple(r.ratio), antialias=True),
        *flip,
    ]
    if r.auto_augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    elif r.auto_augment == "randaugment":
        ops.append(v2.RandAugment())
    return v2.Compose(ops), None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


def seeded(transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int | None) -> torch.Tensor:
    """Apply ``transform`` with its random choices drawn from ``seed`` (the caller's RNG state is kept)."""
    if seed is None:
        return transform(image)
    if torch.utils.data.get_worker_info() is not None:  # a loader worker: its global RNG is its own
        torch.default_generator.manual_seed(seed)
        return transform(image)
    with torch.random.fork_rng(devices=[]):  # the main process: keep the training loop's RNG state
        torch.default_generator.manual_seed(seed)
        return transform(image)


def channel_stats(batches: object) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels in [0, 1], accumulated batch by batch (uint8 NCHW): exact for what
    it is given, and never a float copy of more than one batch."""
    total = total_sq = None
    count = 0
    for x in batches:  # type: ignore[attr-defined]
        f = x.double().div_(255).transpose(0, 1).reshape(x.shape[1], -1)
        s, sq = f.sum(1), (f * f).sum(1)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        count += f.shape[1]
    assert total is not None and total_sq is not None, "no images to estimate statistics from"
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0) * count / max(1, count - 1)
    return mean.tolist(), var.sqrt().clamp_min(1e-3).tolist()
