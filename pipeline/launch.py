"""How this process was launched: torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``), read without importing torch.

A plain ``kdpipe run`` (and an all-cached one above all) must not pay for importing torch just to learn
that it is not one of several torchrun ranks. Only when it is (:func:`launched` is not None) does the
runner import :mod:`kdpipe.ml.runtime.distributed`, which joins the process group. Ground floor: imports only
:mod:`kdpipe.errors`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kdpipe.errors import UsageError


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes torchrun started together."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def role(self) -> str:
        """``"leader"`` (rank 0: plans, runs every stage, alone writes the cache) or ``"follower"``."""
        return "leader" if self.rank == 0 else "follower"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def launched_world_size(env: Mapping[str, str] | None = None) -> int:
    """torchrun's WORLD_SIZE when it started this process as one of several, else 1."""
    return max(1, _int(os.environ if env is None else env, "WORLD_SIZE", 1))


def launched(env: Mapping[str, str] | None = None) -> Launch | None:
    """torchrun's ranks for this process, or None when it was not started as one of several processes."""
    env = os.environ if env is None else env
    size = launched_world_size(env)
    if size <= 1:
        return None
    return Launch(
        rank=_int(env, "RANK", 0),
        local_rank=_int(env, "LOCAL_RANK", 0),
        world_size=size,
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", size),
    )
