"""Data-free distillation in the distill stage (``distill.data: synthetic``).

What is refused before any stage runs, which generator terms the teacher supports, the generator as the training
loop's batch source, and what the distill entry keeps and reports: ``generator.pt`` (its weights) with
``generator.json``, and ``synthetic.npy`` / ``synthetic_labels.npy`` (the last generated uint8 images and the
teacher's class of each), which calibrate int8 variants, since no training image may be read. The generator and its
losses are :mod:`kdpipe.ml.train.datafree`.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.config import LoadedConfig
from kdpipe.errors import ConfigError, describe

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kdpipe.ml.train.datafree import SyntheticSource
    from kdpipe.stages.base import StageContext

GENERATOR = "generator.pt"
GENERATOR_SPEC = "generator.json"
SAMPLES = "synthetic.npy"
SAMPLE_LABELS = "synthetic_labels.npy"
#: methods that keep state per training image (CRD's memory bank): a generated image has no lasting identity
PER_IMAGE_STATE = ("crd", "crd_kd")
GRID_PER_CLASS = 8  # images per class in the report's grid
GRID_CLASSES = 20  # classes shown at most
GRID_PIXELS = 32  # larger images are shrunk to this for the report (the grid is a look, not data)


def is_synthetic(cfg: LoadedConfig) -> bool:
    return cfg.config.distill.data == "synthetic"


def check(cfg: LoadedConfig) -> None:
    """What ``distill.data: synthetic`` cannot do, each a one-line ConfigError before any stage runs."""
    if not is_synthetic(cfg):
        return
    from kdpipe.stages.distillers import DISTILLERS

    conf = cfg.config.distill
    for key, methods in (("distill.method", [conf.method]), ("distill.compare", conf.compare)):
        for method in methods:
            if not DISTILLERS.get(method).signals:
                raise ConfigError(
                    key,
                    f"{method} learns from labelled training images alone, and with distill.data: synthetic there are "
                    "none; use a method that learns from the teacher (kd, simkd)",
                    cfg.source,
                )
            if method in PER_IMAGE_STATE:
                raise ConfigError(
                    key,
                    f"{method} keeps a memory entry per training image, and generated images have no lasting "
                    "identity; use kd or simkd with distill.data: synthetic",
                    cfg.source,
                )
    if cfg.data_parallel_processes > 1:
        raise ConfigError(
            "runtime.nproc",
            "distill.data: synthetic trains its generator in one process; set runtime.nproc: 1 (and run without "
            "torchrun)",
            cfg.source,
        )
    if "bn" in conf.datafree.model_fields_set and conf.datafree.bn > 0:
        reason = _no_batchnorm(cfg)
        if reason:
            raise ConfigError("distill.datafree.bn", f"{reason}; set bn: 0 or leave it unset", cfg.source)


def _no_batchnorm(cfg: LoadedConfig) -> str | None:
    """Why the teacher cannot give the BN-statistics term (built untrained from its architecture), or None."""
    teacher = cfg.config.teacher
    if teacher.source == "torchscript":
        return "the batch-norm term hooks the teacher's BatchNorm layers, which a TorchScript teacher does not expose"
    from kdpipe.ml.models.teacher_build import teacher_arch
    from kdpipe.ml.models.zoo import create_model
    from kdpipe.ml.train.datafree import batchnorm_layers

    try:  # whether it has BatchNorm layers does not depend on the class count or the channels
        name = teacher_arch(teacher, cfg.base)
        model = create_model(name, num_classes=2, in_channels=3, kwargs=teacher.kwargs)
    except Exception:  # the teacher stage says what is wrong with the teacher itself
        return None
    return None if batchnorm_layers(model) else f"the teacher '{name}' has no BatchNorm layers"


def generator_weights(cfg: LoadedConfig, teacher: nn.Module) -> tuple[dict[str, float], dict[str, str]]:
    """Each term's weight as used, and the terms left out with why: the batch-norm term needs BatchNorm layers to
    hook (refused when it was set explicitly, else left out)."""
    import torch

    from kdpipe.ml.train.datafree import TERMS, batchnorm_layers

    conf = cfg.config.distill.datafree
    weights = {term: float(getattr(conf, term)) for term in TERMS}
    left_out: dict[str, str] = {term: "weight 0" for term, w in weights.items() if not w}
    if weights["bn"] and not batchnorm_layers(teacher):
        scripted = any(isinstance(m, torch.jit.ScriptModule) for m in teacher.modules())
        reason = "a TorchScript teacher's BatchNorm layers cannot be hooked" if scripted else (
            "the teacher has no BatchNorm layers")  # fmt: skip
        if "bn" in conf.model_fields_set:
            raise ConfigError("distill.datafree.bn", f"{reason}; set bn: 0 or leave it unset", cfg.source)
        weights["bn"] = 0.0
        left_out["bn"] = reason
    return weights, left_out


def require_validation(cfg: LoadedConfig, val_images: int) -> None:
    """Without training images, the labelled validation split is the only thing that chooses the epoch."""
    if val_images == 0:
        raise ConfigError(
            "data.val_fraction",
            "distill.data: synthetic needs labelled validation images to choose the student's epoch, and this run "
            "has none (were they all skipped as unreadable?)",
            cfg.source,
        )


def make_source(
    ctx: StageContext, teacher: nn.Module, student: nn.Module, device: torch.device, signals: frozenset[str]
) -> SyntheticSource:
    """The generator (seeded from ``distill.train.seed``) as the student's batch source; with ``replay: stored`` and a
    method that needs only the teacher's logits (``signals``), it also gives them (:meth:`SyntheticSource.stored`)."""
    import torch

    from kdpipe.ml.models.loading import frozen
    from kdpipe.ml.train.datafree import Generator, SyntheticSource

    cfg, conf = ctx.cfg, ctx.cfg.config.distill
    data, _ = ctx.data()
    frozen(teacher).to(device)
    weights, left_out = generator_weights(cfg, teacher)
    d = conf.datafree
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(conf.train.seed)
        generator = Generator(d.z_dim, data.num_classes, tuple(data.input_shape), d.width, d.conditional)
    return SyntheticSource(
        generator, teacher, student, d, weights, data.num_classes, data.mean, data.std, cfg.config.data.augment,
        conf.train.batch_size, conf.train.epochs, conf.train.seed, device, list(data.classes), ctx.log, left_out,
        d.replay == "stored" and set(signals) <= {"logits"},
    )  # fmt: skip


def training_data(
    out_dir: Path, source: SyntheticSource | None, history: list[dict[str, Any]], real_images: int
) -> dict[str, Any]:
    """``training_data`` of the distill metrics; for a synthetic run the generator and its samples are saved first."""
    if source is None:
        return {"source": "real", "real_training_images": real_images}
    images, labels = save(out_dir, source, source.conf.samples)
    return summary(source, history, images, labels)


def save(out_dir: Path, source: SyntheticSource, count: int) -> tuple[Any, Any]:
    """The generator's weights and facts, and the last ``count`` generated images with the teacher's classes."""
    import numpy as np
    import torch

    g = source.generator
    torch.save({k: v.detach().cpu() for k, v in g.state_dict().items()}, out_dir / GENERATOR)
    spec = {
        "z_dim": g.z_dim,
        "shape": list(g.shape),
        "width": source.conf.width,
        "conditional": g.embed is not None,
        "num_classes": source.num_classes,
        "output": "images in [0, 1]; normalise with the data's mean and std before a model sees them",
    }
    (out_dir / GENERATOR_SPEC).write_text(json.dumps(spec, indent=2))
    images, labels = source.samples(count)
    np.save(out_dir / SAMPLES, images.numpy())
    np.save(out_dir / SAMPLE_LABELS, labels.numpy())
    return images, labels


def summary(source: SyntheticSource, history: list[dict[str, Any]], images: Any, labels: Any) -> dict[str, Any]:
    """``training_data`` of the distill metrics (report.json): what the student was trained on, which generator
    terms were used, whether the generator collapsed, and a small grid of generated images per class."""
    from kdpipe.ml.models.zoo import count_parameters

    records = [(h["epoch"], h["generator"]) for h in history if "generator" in h]
    collapsed = [{"epoch": e, "reason": g["collapse"]} for e, g in records if g.get("collapse")]
    last = records[-1][1] if records else {}
    return {
        "source": "synthetic",
        "real_training_images": 0,
        "generator": {
            "terms": [t for t, w in source.weights.items() if w],
            "weights": {t: w for t, w in source.weights.items() if w},
            "left_out": source.left_out,
            "conditional": source.generator.embed is not None,
            "replay": "stored" if source.stored else "online",
            "z_dim": source.generator.z_dim,
            "parameters": count_parameters(source.generator),
            "steps": sum(g["steps"] for _, g in records),
            "images": sum(g["steps"] for _, g in records) * source.conf.batch_size,
            "file": GENERATOR,
        },
        "collapse": {
            "detected": bool(collapsed),
            "epochs": collapsed,
            "largest_share_last_epoch": last.get("largest_share"),
            "entropy_last_epoch": last.get("entropy"),
            "thresholds": {"largest_share": source.conf.collapse_share, "entropy": source.conf.collapse_entropy},
        },
        "samples": {"file": SAMPLES, "count": len(images), "grid": grid(images, labels, source.classes)},
    }


def grid(images: Any, labels: Any, classes: list[str]) -> dict[str, Any]:
    """Up to :data:`GRID_PER_CLASS` images of each class (by the teacher's prediction) of the first
    :data:`GRID_CLASSES` classes, shrunk to :data:`GRID_PIXELS`, as zlib-compressed uint8 (N, C, H, W) in base64."""
    import torch
    import torch.nn.functional as F

    shown = classes[:GRID_CLASSES]
    picks = [torch.nonzero(labels == k).flatten()[:GRID_PER_CLASS] for k in range(len(shown))]
    counts = [len(p) for p in picks]
    chosen = images[torch.cat(picks)] if sum(counts) else images[:0]
    h, w = chosen.shape[2:]
    if max(h, w) > GRID_PIXELS and len(chosen):
        size = (max(1, h * GRID_PIXELS // max(h, w)), max(1, w * GRID_PIXELS // max(h, w)))
        chosen = F.interpolate(chosen.float(), size=size, mode="area").round().clamp(0, 255).to(torch.uint8)
    raw = chosen.contiguous().numpy().tobytes()
    return {
        "classes": shown,
        "total_classes": len(classes),
        "counts": counts,
        "shape": list(chosen.shape[1:]),
        "encoding": "zlib+base64 uint8 NCHW, class by class",
        "data": base64.b64encode(zlib.compress(raw, 9)).decode("ascii"),
    }


def calibration_images(distill_dir: Path, n: int) -> torch.Tensor | None:
    """The first ``n`` generated images the distill stage saved (uint8), or None for a student trained on real
    images."""
    import numpy as np
    import torch

    path = distill_dir / SAMPLES
    if not path.is_file():
        return None
    try:
        return torch.from_numpy(np.load(path)[:n])
    except (OSError, ValueError) as exc:
        raise ConfigError("distill.data", f"{path}: unreadable generated images ({describe(exc)})") from None


def check_export(cfg: LoadedConfig) -> None:
    """qad_int8 fine-tunes the student on the training split, which a data-free run must not read."""
    if is_synthetic(cfg) and "qad_int8" in cfg.config.export.variants:
        raise ConfigError(
            "export.variants",
            "qad_int8 fine-tunes the student on real training images, and distill.data: synthetic reads none; drop "
            "qad_int8 (int8_static and int8_fallback calibrate on the generated images)",
            cfg.source,
        )
