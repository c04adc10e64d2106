"""Exceptions that map to kdpipe's exit-code contract.

0 success, 1 a gate failed, 2 bad usage or bad input, 3 a stage failed.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = 160) -> str:
    """The first line of an exception's message (cut to ``limit`` characters), for one-line errors and warnings."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text[:limit] if limit else text


def describe(exc: BaseException, limit: int | None = 160) -> str:
    """``Type: first line of the message`` (just the type when there is no message)."""
    text = first_line(exc, limit)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class KdpipeError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 3


class UsageError(KdpipeError):
    """Bad input: config, data, checkpoint or command line. One line, exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config value is wrong. The message names the key path and the file."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.detail = message
        self.source = source
        where = f" ({source})" if source else ""
        super().__init__(f"{key}: {message}{where}" if key else f"{message}{where}")


class StageError(KdpipeError):
    """A stage ran and failed for a reason other than bad input (exit 3)."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"stage '{stage}' failed: {message}")


class GateFailure(KdpipeError):
    """At least one gate failed (exit 1)."""

    exit_code = 1
