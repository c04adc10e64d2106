"""``timm:NAME``: any ``timm.list_models()`` architecture as a teacher or a student, built offline.

The model is built with the data's channels (``in_chans``) and classes, ``pretrained=False`` always: weights
come only from a local file (``teacher.path``), never from the hub at run time. Models built for one input
size (ViTs: ``fixed_input_size`` in timm's pretrained config) get ``img_size`` = the data's image size unless
the config's kwargs set it. timm's own body/head contract (``forward_features`` / ``forward_head``) is
what :mod:`kdpipe.ml.models.contract_split` cuts such a model at.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

from kdpipe.errors import UsageError, first_line
from kdpipe.ml.models.zoo.base import register_adapter
from kdpipe.registry import UnknownNameError

TIMM_PREFIX = "timm:"


def check_timm_name(arch: str) -> None:
    """An unknown timm architecture is an error suggesting close names (nothing is built)."""
    import timm

    base = arch.split(".", 1)[0]  # "resnet10t.c3_in1k": a tag selects a pretrained config, not an architecture
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
    raise UnknownNameError(f"unknown timm model '{arch}'; {hint}timm.list_models() lists every name")


def fixed_input_size(arch: str) -> bool:
    """Whether timm builds ``arch`` for one input size (a ViT's position embeddings are sized at build time)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch, allow_unregistered=True)
    return bool(cfg and cfg.fixed_input_size)


@register_adapter(TIMM_PREFIX)
def timm_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    image_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A randomly initialised timm model for ``num_classes`` classes and ``in_channels``-channel images.

    Raises:
        UnknownNameError: ``arch`` is not a timm model (the message suggests close names).
        UsageError: the kwargs ask for hub weights, or timm refuses them.
    """
    import timm

    check_timm_name(arch)
    kw = dict(kwargs or {})
    for key in ("pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
        if key in kw:
            raise UsageError(
                f"timm:{arch}: '{key}' is not accepted; kdpipe never downloads weights: give a local file in path"
            )
    for key, value in (("num_classes", num_classes), ("in_chans", in_channels)):
        if key in kw:
            raise UsageError(f"timm:{arch}: '{key}' comes from the data ({value}); drop it from the kwargs")
    if image_size and "img_size" not in kw and fixed_input_size(arch):
        kw["img_size"] = image_size
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)
    except (TypeError, ValueError, AssertionError) as exc:
        first = first_line(exc, 200) or type(exc).__name__
        raise UsageError(f"timm:{arch} cannot be built with {kw or 'its defaults'}: {first}") from None
