"""User code as models: ``FILE.py:FUNC`` (a file, relative to the config) or ``pkg.module:FUNC`` (importable).

This runs the user's code, on purpose: the function is imported and called to build the model. What it
returns must be an ``nn.Module`` mapping images to logits. It is called with whichever of ``num_classes``,
``in_channels`` and ``image_size`` it accepts (by name), plus the config's kwargs, so
``def build_teacher():`` and ``def build_teacher(num_classes, in_channels=3, width=64):`` both work.

The entry point's source bytes (the file, or the module's ``__file__``) are part of the stages' cache keys
(:func:`source_digest`): editing the function's file rebuilds the model. Other files it imports are not
tracked; keep the model in one file or force a re-run. This module imports torch only to build.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kdpipe.errors import UsageError, describe

if TYPE_CHECKING:
    from torch import nn

PYTHON_PREFIX = "python:"
BUILD_ARGS = ("num_classes", "in_channels", "image_size")
_LOADED: dict[tuple[str, int, int], ModuleType] = {}


@dataclass(frozen=True)
class EntryPoint:
    """A function to call: ``target`` is an absolute ``.py`` path (``is_file``) or a dotted module name."""

    target: str
    function: str
    is_file: bool

    def __str__(self) -> str:
        return f"{self.target}:{self.function}"

    @property
    def label(self) -> str:
        """How messages name it: ``models.py:build`` (the file's name; the key and config are named beside it)."""
        return f"{Path(self.target).name}:{self.function}" if self.is_file else str(self)


def parse_entrypoint(text: str, base: Path | None = None) -> EntryPoint:
    """``models.py:build`` (resolved against ``base``, the config's folder) or ``pkg.models:build``."""
    target, sep, function = text.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise UsageError(f"entry point '{text}' must look like FILE.py:FUNCTION or package.module:FUNCTION")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        return EntryPoint(str(path.resolve()), function, True)
    if not all(part.isidentifier() for part in target.split(".")):
        raise UsageError(f"entry point '{text}': '{target}' is neither a .py file nor a dotted module name")
    return EntryPoint(target, function, False)


def resolve_model_name(name: str, base: Path | None) -> str:
    """``python:models.py:f`` with the file made absolute against ``base``; any other model name unchanged.

    What is stored in specs, so validate and export rebuild the model wherever they run from.
    """
    if not name.startswith(PYTHON_PREFIX):
        return name
    return PYTHON_PREFIX + str(parse_entrypoint(name[len(PYTHON_PREFIX) :], base))


def model_label(name: str) -> str:
    """A model name as messages show it: ``models.py:build`` for ``python:/abs/models.py:build``, else the name."""
    if not name.startswith(PYTHON_PREFIX):
        return name
    try:
        return parse_entrypoint(name[len(PYTHON_PREFIX) :]).label
    except UsageError:
        return name


def source_file(ep: EntryPoint) -> Path:
    """The file holding the entry point's code (found without importing it)."""
    if ep.is_file:
        path = Path(ep.target)
    else:
        try:
            spec = importlib.util.find_spec(ep.target)
        except (ImportError, ValueError) as exc:
            raise UsageError(f"entry point '{ep}': module '{ep.target}' cannot be found ({exc})") from None
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            raise UsageError(f"entry point '{ep}': module '{ep.target}' is not importable from here")
        path = Path(spec.origin)
    if not path.is_file():
        raise UsageError(f"entry point '{ep}': file not found: {path}")
    return path


def source_digest(ep: EntryPoint) -> str:
    """sha256 of the entry point's source bytes: what the cache key holds."""
    return hashlib.sha256(source_file(ep).read_bytes()).hexdigest()


def _import_file(path: Path) -> ModuleType:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    name = "kdpipe_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    _LOADED[key] = module
    return module


def load_callable(ep: EntryPoint) -> Callable[..., Any]:
    """Import the entry point (running the module's top-level code) and return its function."""
    path = source_file(ep)
    try:
        module = _import_file(path) if ep.is_file else importlib.import_module(ep.target)
    except UsageError:
        raise
    except BaseException as exc:
        raise UsageError(f"entry point '{ep.label}': importing {path.name} raised {describe(exc)}") from None
    fn = getattr(module, ep.function, None)
    if not callable(fn):
        known = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:12]
        has = ", ".join(known) or "nothing callable"
        raise UsageError(f"entry point '{ep.label}': {path.name} has no function '{ep.function}' (it has: {has})")
    return fn


def accepted_args(fn: Callable[..., Any]) -> set[str]:
    """Which of the build arguments (:data:`BUILD_ARGS`) the user's function takes by name."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {a for a in BUILD_ARGS if takes_any or a in params}


def build_from_entrypoint(
    ep: EntryPoint,
    num_classes: int,
    in_channels: int,
    image_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Call the user's function with the build arguments it accepts; it must return an ``nn.Module``."""
    from torch import nn  # imported here: parsing and fingerprinting entry points (kdpipe status) need no torch

    fn = load_callable(ep)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    takes = accepted_args(fn)
    call = {k: v for k, v in offered.items() if k in takes and v is not None}
    call.update(kwargs or {})
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    try:
        model = fn(**call)
    except Exception as exc:
        raise UsageError(f"{ep.label}({args}) raised {describe(exc)}") from None
    if not isinstance(model, nn.Module):
        what = type(model).__name__
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise UsageError(f"{ep.label}({args}) returned {article} {what}, not a torch.nn.Module")
    return model
