"""Dataset condensation by distribution matching (DM; Zhao & Bilen, "Dataset Condensation with Distribution
Matching", WACV 2023), with differentiable siamese augmentation (DSA; Zhao & Bilen, ICML 2021).

N synthetic images per class start as N random real images of that class (the train split only). Every
iteration draws a fresh randomly initialised ConvNet (:class:`ConvNet`: D blocks of conv 3x3, instance norm,
ReLU, average pooling; no training) and, class by class, applies one random DSA transform to a batch of real
images and, with the same parameters, to the class's synthetic images; the loss is the squared distance
between the two batches' mean embeddings (MMD with a linear kernel), summed over classes. Only the synthetic
pixels learn (SGD, momentum 0.5); after each step they are clipped to the pixel range, so what is optimised is
what the uint8 PNGs hold. With ``iterations: 0`` the result is the random real subset it started from: the
baseline with the same seed-fixed selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kdpipe.errors import UsageError
from kdpipe.ml.data.dsa import DSA


@dataclass(frozen=True)
class DMSettings:
    """How a transfer set is condensed (all of it goes into provenance.json)."""

    per_class: int
    # defaults measured on Fashion-MNIST on 2 busy CPU cores (benchmarks/condensed.py, 10 per class): the paper's
    # ConvNet width 128 and 20,000 iterations cost hours there. What paid was a less noisy real mean: 128 real images a
    # class at lr 1 gave +2.83 pp over random-10 in 22 min (256: +3.02 in twice the time), 32 at lr 4 +0.69 to +1.34
    iterations: int = 2000
    lr: float = 1.0  # of the synthetic pixels, in normalised units (the paper's)
    momentum: float = 0.5
    real_batch: int = 128  # real images per class per iteration (the paper: 256)
    width: int = 32  # ConvNet channels (the paper: 128)
    depth: int | None = None  # ConvNet blocks; None: 3 up to 32 px, one more per doubling of the size
    dsa: bool = True
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def convnet_depth(size: int) -> int:
    """ConvNet-3 for 32 px and smaller (the paper's), one block more per doubling beyond."""
    return 3 + max(0, math.ceil(math.log2(max(size, 1) / 32)))


class ConvNet(nn.Module):
    """The condensation papers' ConvNet-D: [conv 3x3 → instance norm → ReLU → avg pool 2] x D; the embedding is
    the flattened last map (no classifier is needed). Instance norm is GroupNorm with one group per channel."""

    def __init__(self, channels: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d in range(depth):
            layers += [
                nn.Conv2d(channels if d == 0 else width, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


# --------------------------------------------------------------------------------------------- matching
def class_pools(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def check_enough(labels: torch.Tensor, classes: list[str], per_class: int, where: str) -> None:
    """Every class needs at least ``per_class`` training images to start from; say which does not."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    short = [(c, n) for c, n in zip(classes, counts, strict=True) if n < per_class]
    if short:
        name, n = short[0]
        more = f" ({len(short) - 1} more class{'es' if len(short) > 2 else ''} too)" if len(short) > 1 else ""
        raise UsageError(
            f"{where}: class '{name}' has {n} training image{'s' if n != 1 else ''}, fewer than --per-class "
            f"{per_class}{more}"
        )


def initial_subset(labels: torch.Tensor, num_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` random images of each class, class by class (seeded): DM's starting point and
    the random baseline of the same size."""
    g = torch.Generator().manual_seed(seed)
    pools = class_pools(labels, num_classes)
    return torch.cat([pool[torch.randperm(len(pool), generator=g)[:per_class]] for pool in pools])


def dm_loss(
    net: nn.Module,
    real: list[torch.Tensor],
    syn: list[torch.Tensor],
    dsa: DSA | None,
    g: torch.Generator,
) -> torch.Tensor:
    """Sum over classes of ||mean embedding of the real batch − mean embedding of the synthetic images||², with
    one siamese DSA transform per class applied to both. Real embeddings carry no gradient."""
    real_in, syn_in = [], []
    for r, s in zip(real, syn, strict=True):
        if dsa is not None:
            p = dsa.sample(1, tuple(r.shape[1:]), g)
            r, s = dsa.apply(r, p), dsa.apply(s, p)
        real_in.append(r)
        syn_in.append(s)
    with torch.no_grad():  # instance norm is per image: one forward for every class is the same as one per class
        real_emb = net(torch.cat(real_in)).split([len(r) for r in real_in])
    syn_emb = net(torch.cat(syn_in)).split([len(s) for s in syn_in])
    return sum(((r.mean(0) - s.mean(0)) ** 2).sum() for r, s in zip(real_emb, syn_emb, strict=True))


@dataclass
class Condensed:
    images: torch.Tensor  # uint8 (K * per_class, C, H, W)
    labels: torch.Tensor  # int64, class by class
    start: torch.Tensor  # the real images' indices they started from
    losses: list[float]  # the DM loss of each iteration


def condense(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    settings: DMSettings,
    mean: list[float],
    std: list[float],
    device: torch.device | None = None,
    step: Callable[[int, float], None] | None = None,
) -> Condensed:
    """Condense uint8 training images (the train split) into ``settings.per_class`` images per class by DM.

    ``step(iteration, loss)`` is called after every iteration (progress). Deterministic for a seed on one device.
    """
    device = device or torch.device("cpu")
    s = settings
    torch.manual_seed(s.seed)  # the random ConvNets' initialisations
    g = torch.Generator().manual_seed(s.seed + 1)  # real batches and augmentation
    start = initial_subset(train_y, num_classes, s.per_class, s.seed)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    sd = torch.tensor(std, device=device).view(1, -1, 1, 1)
    norm = lambda u8: (u8.to(device).float() / 255 - m) / sd  # noqa: E731
    syn = norm(train_x[start]).detach().requires_grad_(True)
    labels = train_y[start].clone()
    lo, hi = (0 - m) / sd, (1 - m) / sd
    pools = class_pools(train_y, num_classes)
    opt = torch.optim.SGD([syn], lr=s.lr, momentum=s.momentum)
    dsa = DSA() if s.dsa else None
    channels, size = train_x.shape[1], max(train_x.shape[2:])
    depth = s.depth or convnet_depth(size)
    losses: list[float] = []
    for it in range(s.iterations):
        net = ConvNet(channels, s.width, depth).to(device)
        for p in net.parameters():
            p.requires_grad_(False)
        real = [norm(train_x[pool[torch.randperm(len(pool), generator=g)[: s.real_batch]]]) for pool in pools]
        loss = dm_loss(net, real, list(syn.split(s.per_class)), dsa, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            syn.copy_(torch.maximum(torch.minimum(syn, hi), lo))
        losses.append(float(loss.detach()))
        if step is not None:
            step(it, losses[-1])
    images = ((syn.detach() * sd + m) * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    return Condensed(images, labels, start, losses)


# ------------------------------------------------------------------------------------------ the command
def source_config(cfg: Any) -> Any:
    """The config as the dataset's own: ``data.transfer_set`` dropped (a set is condensed from the real train
    split, so one config both condenses and trains on the result)."""
    from kdpipe.config import LoadedConfig

    data = cfg.config.data.model_copy(update={"transfer_set": None, "transfer_repeats": 1})
    return LoadedConfig(cfg.config.model_copy(update={"data": data}), cfg.path)


def make_transfer_set(
    cfg: Any, out: Any, settings: DMSettings, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Condense the config's training split (never val or test) into ``out`` (:mod:`kdpipe.ml.data.transfer_sets`):
    ``settings.per_class`` images per class, with provenance. Returns the provenance written."""
    import time
    from pathlib import Path

    from tqdm import tqdm

    from kdpipe.fileio import FileDigests
    from kdpipe.ml.data.imagedata import open_data
    from kdpipe.ml.data.sources import dataset_fingerprint
    from kdpipe.ml.data.transfer_sets import check_output, write_transfer_set
    from kdpipe.ml.runtime.device import pick_device
    from kdpipe.version import __version__

    out = Path(out)
    check_output(out, force)  # before any work
    cfg = source_config(cfg)
    source = dataset_fingerprint(cfg, FileDigests(cfg.cache_dir / "fingerprints.json"))  # read, never written
    data, splits = open_data(cfg)
    if not isinstance(data.train_x, torch.Tensor):
        raise UsageError(f"{cfg.source}: kdpipe condense needs the dataset in memory, and this one streams")
    train_x, train_y = data.train_x[splits.train_idx], data.train_y[splits.train_idx]
    check_enough(train_y, list(data.classes), settings.per_class, f"{cfg.source}, train split")
    device = pick_device(cfg.config.runtime.device)
    if cfg.config.runtime.threads:
        torch.set_num_threads(cfg.config.runtime.threads)
    bar = tqdm(total=settings.iterations, desc=f"condense {settings.per_class}/class", unit="it",
               disable=None if progress else True, leave=False, dynamic_ncols=True)  # fmt: skip
    t0 = time.perf_counter()

    def step(it: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        result = condense(train_x, train_y, data.num_classes, settings, data.mean, data.std, device, step)
    finally:
        bar.close()
    tenth = max(1, len(result.losses) // 10)
    provenance = {
        "method": "distribution_matching" if settings.iterations else "random_real",
        "per_class": settings.per_class,
        "iterations": settings.iterations,
        "seed": settings.seed,
        "settings": {**settings.as_dict(), "depth": settings.depth or convnet_depth(max(train_x.shape[2:]))},
        "loss": {"first": _mean(result.losses[:tenth]), "last": _mean(result.losses[-tenth:])},
        "seconds": round(time.perf_counter() - t0, 1),
        "source": {
            "config_file": str(cfg.path) if cfg.path else None,
            "data": cfg.section("data"),
            "fingerprint": source,
            "split": "train",
            "train_images": len(train_y),
            "start_indices": splits.train_idx[result.start].tolist(),  # the real images the set started from
        },
        "shape": list(data.input_shape),
        "normalize": {"mean": list(data.mean), "std": list(data.std)},
        "versions": {"kdpipe": __version__, "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return write_transfer_set(out, result.images.numpy(), result.labels.numpy(), list(data.classes), provenance, force)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None
