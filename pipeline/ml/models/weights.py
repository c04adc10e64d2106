"""Model weights on disk: safetensors first, PyTorch state_dict files read with ``weights_only=True``.

A weights file is input from outside, and a pickle is a program: ``torch.load(weights_only=False)`` runs
whatever the file says. So every weights file kdpipe reads goes through :func:`load_weights`, which reads
safetensors (no code at all) or a torch file with ``weights_only=True`` (tensors and plain containers only),
and refuses anything else unless the user opted in with ``allow_pickle: true``. Every failure (missing,
truncated, corrupt, a pickle with code) is one line naming the file, exit 2. :func:`save_weights` writes
safetensors atomically, so an interrupted run never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.errors import ConfigError, first_line

SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "module", "state_dict_ema", "model_ema")


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` holds safetensors: by its suffix, or by its header (8-byte length, then a JSON object)."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= path.stat().st_size - 8


def _first_line(exc: BaseException, limit: int = 160) -> str:
    return first_line(exc, limit) or type(exc).__name__[:limit]


def _read_safetensors(path: Path, key: str, source: str | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ValueError: all mean "not a usable file"
        raise ConfigError(
            key, f"{path.name} is not a readable safetensors file, truncated or corrupt? ({_first_line(exc)})", source
        ) from None


def _unpickler_reason(exc: BaseException) -> str:
    """The specific line of torch's long weights_only refusal (it starts with paragraphs of general advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines()[1:]]
    keep = [ln for ln in lines if ln and not ln.startswith(("Check the documentation", "Please file an issue"))]
    return (keep[0] if keep else _first_line(exc))[:160]


def _read_torch(path: Path, key: str, source: str | None, allow_pickle: bool, opt_in: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        # weights_only refuses unknown globals before calling any of them: nothing in the file has run.
        reason = _unpickler_reason(exc)
        if "global" in reason.lower():
            raise ConfigError(
                key,
                f"{path.name} is not a plain state_dict ({reason}); if you trust the file, set {opt_in}: true",
                source,
            ) from None
        raise ConfigError(
            key, f"{path.name} is not a readable PyTorch checkpoint, truncated or corrupt? ({reason})", source
        ) from None
    except Exception as exc:  # a zip cut short, random bytes, an empty file
        raise ConfigError(
            key,
            f"{path.name} is not a readable PyTorch checkpoint, truncated or corrupt? "
            f"({type(exc).__name__}: {_first_line(exc, 100)})",
            source,
        ) from None


def unwrap_state_dict(obj: Any) -> Any:
    """The state_dict inside common checkpoint layouts: ``{"state_dict": ...}`` and friends, DDP's ``module.``."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for wrapper in WRAPPER_KEYS:
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):  # DataParallel / DDP
            obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_weights(
    path: Path,
    *,
    key: str = "",
    source: str | None = None,
    allow_pickle: bool = False,
    opt_in: str = "teacher.allow_pickle",
) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` file or a PyTorch checkpoint.

    Args:
        path: the file. Safetensors is recognised by suffix or header, anything else is read by ``torch.load``.
        key: the config key that named the file (errors start with it).
        source: the config file's name (errors end with it).
        allow_pickle: read a torch file with ``weights_only=False``. Runs the file's code: only for trusted files.
        opt_in: the config key that sets ``allow_pickle``, named in the refusal so the user knows the way out.

    Raises:
        ConfigError: missing, truncated or corrupt file; a pickle that needs code; something not a state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}", source)
    if is_safetensors(path):
        state: Any = _read_safetensors(path, key, source)
    else:
        state = unwrap_state_dict(_read_torch(path, key, source, allow_pickle, opt_in))
    if not isinstance(state, Mapping):
        raise ConfigError(key, f"{path.name} holds a {type(state).__name__}, not a state_dict", source)
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        what = type(state[bad]).__name__
        raise ConfigError(key, f"{path.name} is not a state_dict: entry '{bad}' is a {what}, not a tensor", source)
    return dict(state)


def state_of(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a model's (or a state_dict's) tensors.

    Copies, because safetensors refuses tensors that share storage (tied weights) and views into larger
    buffers; a copy per entry is what it needs and keeps loading with ``load_state_dict`` unchanged.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(
    model_or_state: nn.Module | Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a model's weights to ``path`` as safetensors, atomically (readers see the old file or the new one).

    ``metadata`` values that are not strings are stored as JSON (safetensors metadata is str → str).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state_of(model_or_state), tmp, metadata=meta or None)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
