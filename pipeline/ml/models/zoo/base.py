"""The zoo's registry and builders: :data:`MODELS`, :func:`create_model` (zoo names and prefixed adapters).

A name with a prefix is handed to that prefix's adapter (:data:`ADAPTERS`): ``torchvision:NAME`` here,
``timm:NAME`` (:mod:`kdpipe.ml.models.zoo.timm_models`) and ``python:FILE.py:FUNC`` / ``python:pkg.mod:FUNC``
(:mod:`kdpipe.ml.models.zoo.user_code`). An adapter takes the name after the prefix plus the build arguments.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

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


Adapter = Callable[..., nn.Module]
#: prefix (with its colon) → ``builder(name, num_classes=, in_channels=, image_size=, kwargs=)``
ADAPTERS: dict[str, Adapter] = {}


def register_adapter(prefix: str) -> Callable[[Adapter], Adapter]:
    """Decorator: models named ``PREFIX:NAME`` are built by the decorated function."""

    def deco(fn: Adapter) -> Adapter:
        if prefix in ADAPTERS:
            raise ValueError(f"model prefix '{prefix}' is registered twice")
        ADAPTERS[prefix] = fn
        return fn

    return deco


@register_adapter(TORCHVISION_PREFIX)
def _torchvision_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    image_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
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
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **dict(kwargs or {}))
    return GrayToRGB(model) if in_channels == 1 else model


def create_model(
    name: str,
    num_classes: int,
    in_channels: int,
    *,
    image_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a randomly initialised model by name.

    Args:
        name: a registered zoo name (see :func:`model_names`) or ``PREFIX:NAME`` for an adapter
            (``torchvision:``, ``timm:``, ``python:``).
        num_classes: size of the classifier output.
        in_channels: channels of the input images (1 for MNIST-like data, 3 for RGB).
        image_size: the data's square image size, for models built for one input size (ViTs).
        kwargs: extra constructor arguments (adapters only; zoo models take none).

    Raises:
        UnknownNameError: the name is neither registered nor known to its adapter.
        UsageError: the model cannot be built as asked (e.g. channels a torchvision model cannot take).
    """
    prefix = next((p for p in ADAPTERS if name.startswith(p)), None)
    if prefix is not None:
        return ADAPTERS[prefix](
            name[len(prefix) :], num_classes=num_classes, in_channels=in_channels, image_size=image_size, kwargs=kwargs
        )
    if kwargs:
        raise UsageError(f"zoo model '{name}' takes no extra arguments (got {', '.join(sorted(kwargs))})")
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


def model_names() -> list[str]:
    """Sorted names of the registered (non-torchvision) models."""
    return MODELS.names()


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
