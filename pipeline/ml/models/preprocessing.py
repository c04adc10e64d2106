"""The teacher's own preprocessing, carried with it: inputs re-normalised from the data's statistics to the
normalisation the teacher's weights were trained with.

Every model in a run sees images normalised with the data's mean and std. A teacher fine-tuned elsewhere
expects its own (timm's ImageNet statistics, say); fed the data's, it scores near chance without any error.
So a loaded teacher gets a fixed per-channel affine map in front of it, ``x * scale + shift``, that turns
data-normalised input into teacher-normalised input. Only the teacher sees it: a SimKD student reuses the
teacher's head, which reads features, not pixels.

Where the teacher's normalisation comes from, first match wins: ``teacher.preprocessing`` (inline mean/std,
or a JSON/YAML sidecar file, e.g. the ``config.json`` timm saves beside weights); for weights loaded from a
file, the normalisation kdpipe recorded in a safetensors file it wrote, else timm's pretrained config of the
architecture (a teacher trained here learnt the data's own).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kdpipe.errors import ConfigError


class Renormalize(nn.Module):
    """``x * scale + shift`` per channel: data-normalised input → teacher-normalised input."""

    def __init__(self, scale: Sequence[float], shift: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(list(scale), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(list(shift), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class Preprocessed(nn.Module):
    """A teacher with its input re-normalisation in front; :func:`~kdpipe.ml.models.split.split_model` splits the
    inner model and puts ``renorm`` at the start of the body."""

    def __init__(self, renorm: Renormalize, model: nn.Module) -> None:
        super().__init__()
        self.renorm = renorm
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.renorm(x))


def adapter_spec(
    data_mean: Sequence[float], data_std: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> dict[str, list[float]] | None:
    """The affine map from data normalisation to (mean, std); None when they are the same."""
    scale = [ds / s for ds, s in zip(data_std, std, strict=True)]
    shift = [(dm - m) / s for dm, m, s in zip(data_mean, mean, std, strict=True)]
    if all(abs(a - 1) < 1e-6 for a in scale) and all(abs(b) < 1e-6 for b in shift):
        return None
    return {"scale": scale, "shift": shift, "mean": list(mean), "std": list(std)}


def with_adapter(model: nn.Module, spec: Mapping[str, Any] | None) -> nn.Module:
    """``model`` behind its re-normalisation (from a teacher spec's ``input_adapter``), or as it is."""
    if not spec:
        return model
    return Preprocessed(Renormalize(spec["scale"], spec["shift"]), model)


def _fit_channels(values: Sequence[float], channels: int, key: str, source: str | None) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if channels == 1 and len(values) == 3:  # an RGB model given gray images (timm sums its first conv over RGB)
        return [sum(values) / 3]
    raise ConfigError(key, f"{len(values)} values for {channels}-channel images", source)


def read_sidecar(path: Path, key: str, source: str | None) -> tuple[list[float], list[float]]:
    """mean and std from a JSON/YAML file: at its top level or under ``pretrained_cfg`` (timm's config.json)."""
    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}", source)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0][:100]
        raise ConfigError(key, f"{path.name} is not valid JSON/YAML ({first})", source) from None
    for where in (data, (data or {}).get("pretrained_cfg") if isinstance(data, dict) else None):
        if isinstance(where, dict) and "mean" in where and "std" in where:
            return list(where["mean"]), list(where["std"])
    raise ConfigError(key, f"{path.name} has no mean and std (top level or under pretrained_cfg)", source)


def model_normalization(model: nn.Module) -> tuple[list[float], list[float]] | None:
    """mean/std of timm's pretrained config of ``model`` (any model carrying a ``pretrained_cfg``), else None."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("mean") and cfg.get("std"):
        return list(cfg["mean"]), list(cfg["std"])
    return None


def teacher_normalization(
    conf: Any,
    model: nn.Module,
    loaded: bool,
    channels: int,
    resolve: Any,
    source: str | None,
    weights_meta: Mapping[str, str] | None = None,
) -> tuple[list[float], list[float], str] | None:
    """The normalisation a teacher's weights expect, and where it was found; None: the data's own.

    Args:
        conf: the teacher config section (``preprocessing``).
        model: the built teacher (for timm's pretrained config).
        loaded: whether its weights came from a file (a teacher trained here uses the data's normalisation).
        channels: the data's image channels.
        resolve: the config's path resolver (a sidecar is relative to the config).
        weights_meta: the loaded safetensors file's metadata; kdpipe writes the normalisation its teachers
            were trained with there (``kdpipe_mean`` / ``kdpipe_std``), so its own teachers reload correctly.
    """
    pre = conf.preprocessing
    if isinstance(pre, str):
        mean, std = read_sidecar(resolve(pre), "teacher.preprocessing", source)
        origin = f"sidecar {Path(pre).name}"
    elif pre is not None:
        mean, std, origin = list(pre.mean), list(pre.std), "teacher.preprocessing"
    elif loaded and weights_meta and "kdpipe_mean" in weights_meta and "kdpipe_std" in weights_meta:
        mean, std = json.loads(weights_meta["kdpipe_mean"]), json.loads(weights_meta["kdpipe_std"])
        origin = "the weights file's metadata"
    elif loaded and (found := model_normalization(model)) is not None:
        (mean, std), origin = found, "timm pretrained_cfg"
    else:
        return None
    key = "teacher.preprocessing"
    mean, std = _fit_channels(mean, channels, key, source), _fit_channels(std, channels, key, source)
    if any(s <= 0 for s in std):
        raise ConfigError(key, "std values must be > 0", source)
    return mean, std, origin
