"""The zoo's registry and builders: :data:`MODELS`, :func:`create_model` (zoo and ``torchvision:`` names)."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from kdpipe.errors import UsageError
from kdpipe.registry import Registry, UnknownNameError

MODELS: Registry = Registry("model")

TORCHVISION_PREFIX = "torchvision:"


class GrayToRGB(nn.Module):
    """Feeds a 1-channel input to a model that expects 3 channels by repeating the channel (no copy)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, 3, -1, -1))


def _torchvision_model(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision  # imported lazily: only needed for torchvision:* names

    known = sorted(torchvision.models.list_models(module=torchvision.models))
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1)
        hint = f"did you mean '{TORCHVISION_PREFIX}{close[0]}'? " if close else ""
        raise UnknownNameError(
            f"unknown torchvision model '{arch}'; {hint}known: {', '.join(TORCHVISION_PREFIX + k for k in known)}"
        )
    if in_channels not in (1, 3):
        raise UsageError(f"torchvision models take 1 or 3 input channels, got in_channels={in_channels}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    return GrayToRGB(model) if in_channels == 1 else model


def create_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build a randomly initialised model by name.

    Args:
        name: a registered zoo name (see :func:`model_names`) or ``torchvision:<arch>``.
        num_classes: size of the classifier output.
        in_channels: channels of the input images (1 for MNIST-like data, 3 for RGB).

    Raises:
        UnknownNameError: the name is neither registered nor a torchvision classification model.
        UsageError: a torchvision model was asked for with ``in_channels`` other than 1 or 3.
    """
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name[len(TORCHVISION_PREFIX) :], num_classes, in_channels)
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


def model_names() -> list[str]:
    """Sorted names of the registered (non-torchvision) models."""
    return MODELS.names()


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
