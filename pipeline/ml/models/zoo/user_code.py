"""``python:FILE.py:FUNC`` / ``python:pkg.module:FUNC``: a model built by the user's own function.

This runs the user's code (see :mod:`kdpipe.ml.models.entrypoints`). A relative file resolves against the current
folder here; the stages resolve it against the config's folder first (``resolve_model_name``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from kdpipe.ml.models.entrypoints import PYTHON_PREFIX, build_from_entrypoint, parse_entrypoint
from kdpipe.ml.models.zoo.base import register_adapter


@register_adapter(PYTHON_PREFIX)
def user_model(
    target: str,
    num_classes: int,
    in_channels: int,
    image_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    return build_from_entrypoint(parse_entrypoint(target), num_classes, in_channels, image_size, kwargs)
