"""Which torch device a run uses."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``cuda`` when asked for, or for ``auto`` when a GPU is present; else the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
