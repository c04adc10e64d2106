"""One small generic registry for models, distillers and stages (timm's ``@register_model`` idea)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdpipe.errors import UsageError

T = TypeVar("T")


class UnknownNameError(UsageError):
    """A name that is not registered; the message lists the names that exist."""


class Registry(Generic[T]):
    """Maps names to objects (usually constructors).

    Args:
        kind: what the entries are, used in error messages ("model", "distiller").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering an object under ``name``: by default a class's ``name`` attribute (stages,
        distillers, variants declare it once), else the object's ``__name__`` (model constructors)."""

        def deco(obj: T) -> T:
            declared = getattr(obj, "name", None) if isinstance(obj, type) else None
            key = name or (declared if isinstance(declared, str) else None) or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot infer a {self.kind} name for {obj!r}; pass name=")
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the entry called ``name`` or raise an error listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown {self.kind} '{name}'; {hint}known: {', '.join(sorted(self._entries))}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
